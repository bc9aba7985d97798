"""Collectors: one module per source format, behind the contract in `collectors.base`.

`COLLECTORS` is the single extension point: the built-ins are registered here the same way a third-party
collector would be (add an entry mapping a `[[sources]] kind` to an object satisfying `Collector`).
"""

from collectors.base import Collector
from collectors.continue_dev import ContinueCollector
from collectors.gitlog import GitCollector

COLLECTORS: dict[str, Collector] = {
    "continue": ContinueCollector(),
    "git": GitCollector(),
}
