"""The team lead's view: the dashboard's pages and plots, and Prometheus /metrics."""
