"""Publish a version: register it with its exports written inside, or export an older one by hand.

Every promoted version gets `registry/<scope>/<version>/exports/` (pipelines/publish/exports.py: the vLLM
folder, adapter.gguf, the Modelfile and exports.json with the version's served name). The exporter runs as
a child process (`python -m pipelines.publish.exports`), like training: it imports torch and gguf, which
the service never does.

Where: in the registry's hidden staging folder, before the version's name exists (`registry.register`'s
`prepare`). So a version appears with its exports or not at all, and a kill at any point leaves only a
`.incoming-*` folder that nothing serves. Exporting after the rename would leave, after a kill, a
version without exports that is still writable; exporting after the promotion would let a server find a
served version without the files it loads.

A failed export does not block the promotion: the gate judged the adapter, and the PEFT folder itself is
what the builtin gateway and any PEFT server load. The failure is recorded in lineage.json ("exports":
{"ok": false, "error": ...}), in the cycle's summary and in `devtune status`; `devtune publish VERSION
--scope S` retries it once the cause is fixed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pipelines.child import ChildFailed, run_child
from pipelines.publish import registry

EXPORTS = "exports"


def register_with_exports(state_dir: Path, scope: str, adapter_dir: Path, lineage: dict[str, Any], base_model: str,
                          timeout_s: float, log_path: Path) -> tuple[str, dict[str, Any]]:
    """Register `adapter_dir` as the next version of `scope`, its exports written before it appears; returns
    the version and what the export did ({"ok": true, "served_name": ...} or {"ok": false, "error": ...})."""
    outcome: dict[str, Any] = {}

    def prepare(staging: Path, version: str) -> dict[str, Any]:
        outcome.clear()
        outcome.update(export_into(staging, base_model, scope, version, timeout_s, log_path))
        return outcome

    version = registry.register(state_dir, scope, adapter_dir, lineage, prepare=prepare)
    return version, dict(outcome)


def export_into(version_dir: Path, base_model: str, scope: str, version: str, timeout_s: float,
                log_path: Path) -> dict[str, Any]:
    """Run the exporter child on `version_dir` (writing `version_dir/exports`); a failure is returned, not raised."""
    out = version_dir / EXPORTS
    if (out / "exports.json").is_file():
        return _outcome(out, 0.0)
    started = time.monotonic()
    try:
        run_child("pipelines.publish.exports", [str(version_dir), "--base-model", base_model, "--scope", scope,
                                                "--version", version, "--out", str(out)], log_path, timeout_s)
    except ChildFailed as e:
        return {"ok": False, "error": str(e).splitlines()[0], "log": str(log_path)}
    return _outcome(out, time.monotonic() - started)


def export_version_by_hand(state_dir: Path, scope: str, version: str, timeout_s: float) -> dict[str, Any]:
    """`devtune publish`: export a registered version that has no exports (an older one, or one whose export
    failed). Its folder is read-only (0555); it is opened for the exporter and closed again. The exporter
    renames a complete `exports/` into place, so a kill leaves the version as it was, or with a hidden
    `.exports.incoming-*` folder (removed by the next export), never half an `exports/`."""
    version_dir = state_dir / "registry" / registry.check_scope(scope) / version
    if not (version_dir / "adapter_config.json").is_file():
        raise registry.RegistryError(f"{scope} has no version {version}: known versions are "
                                     f"{', '.join(registry.versions(state_dir, scope)) or 'none'}")
    if (version_dir / EXPORTS / "exports.json").is_file():
        return {**_outcome(version_dir / EXPORTS, 0.0), "already": True}
    lineage = json.loads((version_dir / "lineage.json").read_text())
    mode = version_dir.stat().st_mode & 0o777
    version_dir.chmod(mode | 0o700)
    try:
        # The version's own base model: a version is served on the base it was trained on.
        return export_into(version_dir, lineage["base_model"], scope, version, timeout_s,
                           version_dir.parent / f".export-{version}.log")
    finally:
        exports = version_dir / EXPORTS
        if exports.is_dir():
            os.chmod(exports, 0o555)
        version_dir.chmod(mode)


def exports_of(version_dir: Path) -> dict[str, Any] | None:
    """A version's exports.json, or None when it has none."""
    path = version_dir / EXPORTS / "exports.json"
    if not path.is_file():
        return None
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def _outcome(out: Path, seconds: float) -> dict[str, Any]:
    manifest = json.loads((out / "exports.json").read_text())
    return {"ok": True, "served_name": manifest["served_name"], "files": sorted(manifest["files"]),
            "seconds": round(seconds, 1)}
