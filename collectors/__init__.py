"""Collectors: one module per source format, behind the contract in `collectors.base`.

`COLLECTORS` is the single extension point: the built-ins are registered here the same way a third-party
collector would be (add an entry mapping a `[[sources]] kind` to an object satisfying `Collector`).
"""

from collectors.base import Collector
from collectors.continue_dev import ContinueCollector
from collectors.continue_http import ContinueHttpCollector
from collectors.gateway_log import GatewayLogCollector
from collectors.gitlog import GitCollector
from collectors.tabby import TabbyCollector

COLLECTORS: dict[str, Collector] = {
    "continue": ContinueCollector(),
    "tabby": TabbyCollector(),
    "git": GitCollector(),
    # The service's own inbox for Continue's HTTP `data:` destination (enabled by [continue_http]).
    "continue_http": ContinueHttpCollector(),
    # The serving gateway's request log (enabled by [serve]).
    "gateway": GatewayLogCollector(),
}
