"""The layering rules from DESIGN.md, checked in fresh interpreters."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from support import ROOT


def modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_service_and_cli_import_neither_torch_nor_transformers() -> None:
    loaded = modules_after("import daemon.service, daemon.cli, daemon.jobs, daemon.api, daemon.watch")
    # ray too: pipelines/train/ray_backend.py imports it only when a job is submitted or watched
    heavy = {m for m in loaded if m.split(".")[0] in {"torch", "transformers", "peft", "trl", "accelerate", "ray"}}
    assert heavy == set(), f"the service imported {sorted(heavy)[:5]}"
    assert "pipelines.cycle" in loaded  # the check is meaningful: the cycle itself is imported
    assert "pipelines.train.ray_backend" in loaded


def test_the_service_process_loads_no_store() -> None:
    # `devtune run` is daemon.cli then daemon.service: what needs DuckDB, pyarrow or a tokenizer runs in the store
    # worker (daemon/worker.py), which an idle service has stopped (bench/idle_service.py: 41 MB at rest).
    loaded = modules_after("import daemon.cli, daemon.service")
    heavy = {m for m in loaded if m.split(".")[0] in {"duckdb", "pyarrow", "tokenizers", "numpy", "prometheus_client"}}
    assert heavy == set(), f"the service process imported {sorted(heavy)[:5]}"
    assert {"daemon.front", "daemon.watch", "collectors.gitlog"} <= loaded  # what it does need is there
    worker = modules_after("import daemon.worker")
    assert {"duckdb", "pyarrow", "pipelines.store.db", "daemon.jobs"} <= worker


def test_collectors_import_neither_pipelines_nor_daemon() -> None:
    loaded = modules_after("import collectors, collectors.base, collectors.continue_dev, collectors.gitlog, "
                           "collectors.jsonl")
    assert "collectors.gitlog" in loaded
    assert not {m for m in loaded if m.split(".")[0] in {"pipelines", "daemon"}}


def test_daemon_package_is_ours_not_python_daemon() -> None:
    # The PyPI package python-daemon also installs a top-level `daemon`.
    import daemon

    assert Path(daemon.__file__).resolve().parent == ROOT / "daemon"


def test_no_test_folder_shadows_a_package() -> None:
    for pkg in ("daemon", "collectors", "pipelines"):
        assert not (ROOT / "tests" / pkg / "__init__.py").exists()


# -- the import graph, read from the source (function-level imports included) ----------------------------------

PACKAGES = ("daemon", "collectors", "pipelines")


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its body."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{module}: imports are absolute (line {node.lineno})"
                base = node.module or ""
                # `from pipelines import child` imports the module pipelines.child
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def test_the_graph_is_read_from_the_code() -> None:
    graph = import_graph()
    assert "pipelines.datasets.outcomes" in graph["pipelines.datasets.sft"]
    assert "collectors" in graph["daemon.cli"]
    assert "pipelines.train.backends" in graph["daemon.worker"]  # `from pipelines.train import backends`


def test_no_module_of_pipelines_or_collectors_imports_daemon() -> None:
    upward = sorted(f"{m} -> {t}" for m, ts in import_graph().items() if not m.startswith("daemon")
                    for t in ts if t.startswith("daemon"))
    assert upward == [], "imports that point up into daemon/: " + ", ".join(upward)


def test_collectors_import_no_pipelines_module_but_the_config() -> None:
    found = sorted(f"{m} -> {t}" for m, ts in import_graph().items() if m.startswith("collectors")
                   for t in ts if t.startswith("pipelines") and t != "pipelines.config")
    assert found == [], ", ".join(found)


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph()
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_no_cycle_between_rooms() -> None:
    """Rooms are daemon, collectors and each stage of pipelines (pipelines.store, pipelines.datasets, ...; a
    ground-floor module such as pipelines.config is a room of its own): they form floors, no two lean on
    each other."""
    def room(module: str) -> str:
        return ".".join(module.split(".")[:2]) if module.startswith("pipelines") else module.split(".")[0]

    rooms: dict[str, set[str]] = {}
    for m, ts in import_graph().items():
        rooms.setdefault(room(m), set()).update(room(t) for t in ts if room(t) != room(m))
    assert {"pipelines.datasets", "pipelines.store", "daemon", "collectors"} <= set(rooms)
    cycles = [c for c in strongly_connected(rooms) if len(c) > 1]
    assert cycles == [], "rooms that import each other: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert [sorted(c) for c in strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
            if len(c) > 1] == [["a", "b", "c"]]


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out
