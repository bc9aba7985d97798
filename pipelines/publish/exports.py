"""Export a registry version for the servers that serve it: `python -m pipelines.publish.exports VERSION_DIR`.

    exports/peft/           adapter_config.json + adapter_model.safetensors   vLLM (--lora-modules, load_lora_adapter)
    exports/adapter.gguf    llama.cpp (--lora) and Ollama (ADAPTER), see pipelines/publish/lora_gguf.py
    exports/Modelfile       Ollama: FROM <the base as GGUF> + ADAPTER ./adapter.gguf
    exports/exports.json    the version's served name, its base, its LoRA shape, every file's sha256 and size

Runs as a child process, like training: it imports torch and transformers, which the service never does.
The folder appears complete or not at all: it is built beside `out_dir`, fsynced, and renamed into place;
a killed export leaves only a hidden `.exports.incoming-PID` folder, removed by the next export.

What vLLM needs of the PEFT folder (vllm/lora/peft_helper.py and the LoRA loader): `modules_to_save` empty
("vLLM only supports modules_to_save being None"), no DoRA, LoRA weights only on the modules it wraps (here:
the q/k/v/o/gate/up/down projections; an adapter on lm_head or the embeddings is refused), a rank no larger
than the server's --max-lora-rank, and `base_model_name_or_path` naming the base it serves. Scaling: vLLM
computes lora_alpha / r, or lora_alpha / sqrt(r) when `use_rslora` is set; llama.cpp always alpha / r, and
other servers (and older vLLM) ignore use_rslora. So an rsLoRA adapter is exported with its sqrt(r) folded
into lora_B and use_rslora = false: the same function on every server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from pipelines.publish.lora_gguf import GGUF_ARCHITECTURES, BaseShape, LoraPair, write_lora_gguf
from pipelines.publish.names import served_name

# The modules an exported adapter may adapt: what vLLM wraps in every Llama/Qwen2-style decoder layer and
# what llama.cpp names blk.N.attn_q ... ffn_down.
PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_LORA_KEY = re.compile(r"^base_model\.model\.(model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+))\.lora_([AB])\.weight$")

class ExportError(Exception):
    """A version that cannot be exported; the message says why and what to do."""


def export_version(version_dir: Path, base_model: str, scope: str, version: str, out_dir: Path) -> dict[str, Any]:
    """Write the PEFT folder, adapter.gguf, Modelfile and exports.json of one version into `out_dir`
    atomically; returns exports.json. A version already exported is left as it is (exports, like versions,
    never change) and its exports.json returned."""
    existing = _read_manifest(out_dir)
    if existing is not None:
        return existing
    if out_dir.exists():
        raise ExportError(f"{out_dir} exists but holds no exports.json, so devtune did not write it: move it "
                          "away and export again")
    config, tensors = _read_adapter(version_dir)
    base = _base_config(base_model)
    errors = check_adapter(config, tensors, base)
    if errors:
        raise ExportError(f"{version_dir} cannot be exported for {base_model}:\n  " + "\n  ".join(errors))
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise ExportError(f"{parent} is read-only (the registry makes versions 0555 once registered): export "
                          "before that, or make it writable for the export")
    _remove_stale(out_dir)
    tmp = parent / f".{out_dir.name}.incoming-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _write_exports(tmp, config, tensors, base, base_model, scope, version)
        _fsync_tree(tmp)
        try:
            os.rename(tmp, out_dir)  # a directory rename onto an existing non-empty one fails: nothing is replaced
        except OSError:
            if (winner := _read_manifest(out_dir)) is None:
                raise
            manifest = winner  # a concurrent export of the same version finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(parent)
    return manifest


def check_adapter(config: dict[str, Any], tensors: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """Every reason the adapter cannot be served as exported, all at once; [] when it can."""
    errors = []
    arch = (base.get("architectures") or ["?"])[0]
    if arch not in GGUF_ARCHITECTURES:
        errors.append(f"base architecture {arch}: GGUF export knows {', '.join(sorted(GGUF_ARCHITECTURES))} "
                      "(how llama.cpp's converter lays out another one's q/k rows is not checked here)")
    if config.get("peft_type") != "LORA":
        errors.append(f"peft_type = {config.get('peft_type')!r}: only LoRA adapters export")
    if config.get("modules_to_save"):
        errors.append(f"modules_to_save = {config['modules_to_save']}: vLLM refuses adapters that save whole "
                      "modules and llama.cpp has nowhere to put them; train without modules_to_save")
    for key, why in (("use_dora", "DoRA is not LoRA to vLLM or llama.cpp"),
                     ("lora_bias", "LoRA biases have no place in vLLM or llama.cpp adapters"),
                     ("fan_in_fan_out", "Conv1D-style weights are not a Llama/Qwen layout")):
        if config.get(key):
            errors.append(f"{key} = true: {why}")
    if config.get("bias", "none") != "none":
        errors.append(f"bias = {config['bias']!r}: trained biases are not part of a served LoRA; use \"none\"")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        errors.append("rank_pattern/alpha_pattern are set: vLLM and llama.cpp take one alpha for the whole "
                      "adapter; train with one r and one lora_alpha")
    r, alpha = config.get("r", 0), config.get("lora_alpha", 0)
    bad_rank = not (isinstance(r, int) and r > 0 and isinstance(alpha, int | float) and alpha > 0)
    if bad_rank:
        errors.append(f"r = {r!r}, lora_alpha = {alpha!r}: both must be positive numbers")
    if bad_rank or arch not in GGUF_ARCHITECTURES:
        return errors  # the tensors can only be checked against a known layout and rank
    shapes = _projection_shapes(base)
    halves: dict[str, set[str]] = {}
    unexpected = []
    for key, tensor in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None or PROJECTIONS.get(m.group(4)) != m.group(3):
            unexpected.append(key)
            continue
        module, layer, proj, half = m.group(1), int(m.group(2)), m.group(4), m.group(5)
        halves.setdefault(module, set()).add(half)
        out_features, in_features = shapes[proj]
        want = (r, in_features) if half == "A" else (out_features, r)
        if layer >= base["num_hidden_layers"] or tuple(tensor.shape) != want:
            errors.append(f"{key} has shape {tuple(tensor.shape)}, the base's layer {layer} wants {want}: was the "
                          "adapter trained on another base model?")
    if unexpected:
        errors.append(f"{len(unexpected)} tensors are not LoRA on a q/k/v/o/gate/up/down projection (e.g. "
                      f"{', '.join(unexpected[:3])}): vLLM and llama.cpp serve only those here; set [train] "
                      "target_modules to projections (not lm_head or embed_tokens) and train again")
    errors += [f"{module} has lora_{'A' if 'B' in h else 'B'} missing" for module, h in halves.items() if len(h) < 2]
    if not halves and not unexpected:
        errors.append("the adapter holds no LoRA weights")
    return errors


def _write_exports(out: Path, config: dict[str, Any], tensors: dict[str, Any], base: dict[str, Any],
                   base_model: str, scope: str, version: str) -> dict[str, Any]:
    from safetensors.torch import save_file

    name = served_name(scope, version)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    fold = math.sqrt(r) if config.get("use_rslora") else 1.0
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors}, key=_module_order)
    peft_tensors = {}
    pairs = []
    for module in modules:
        a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        b32 = b.float() * fold
        peft_tensors[f"{module}.lora_A.weight"] = a.contiguous()
        peft_tensors[f"{module}.lora_B.weight"] = b32.to(b.dtype).contiguous()
        pairs.append(LoraPair(module.removeprefix("base_model.model."), a.float().numpy(), b32.numpy()))
    targets = sorted({m.rsplit(".", 1)[1] for m in modules})

    (out / "peft").mkdir()
    peft_config = {**config, "base_model_name_or_path": base_model, "target_modules": targets,
                   "modules_to_save": None, "use_rslora": False, "inference_mode": True}
    (out / "peft" / "adapter_config.json").write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    save_file(peft_tensors, str(out / "peft" / "adapter_model.safetensors"))

    shape = BaseShape(base["architectures"][0], base["num_hidden_layers"], base["num_attention_heads"],
                      base.get("num_key_value_heads") or base["num_attention_heads"])
    n_tensors = write_lora_gguf(out / "adapter.gguf", pairs, alpha, shape, name)
    (out / "Modelfile").write_text(_modelfile(name, scope, version, base_model, base))

    # peft writes its weights 0600; a server usually runs as another user (as in the registry: 0444).
    for p in out.rglob("*"):
        if p.is_file():
            p.chmod(0o444)
    files = {p.relative_to(out).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
             for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = {
        "served_name": name, "scope": scope, "version": version, "base_model": base_model,
        "architecture": shape.architecture,
        "gguf_architecture": _gguf_arch_name(shape.architecture),
        "lora": {"r": r, "lora_alpha": alpha, "scale": alpha / r, "rslora_folded_into_lora_b": fold != 1.0,
                 "target_modules": targets, "modules": len(modules), "gguf_tensors": n_tensors},
        "peft_dir": "peft", "gguf": "adapter.gguf", "modelfile": "Modelfile", "files": files,
    }
    (out / "exports.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "exports.json").chmod(0o444)
    return manifest


def _modelfile(name: str, scope: str, version: str, base_model: str, base: dict[str, Any]) -> str:
    arch = base["architectures"][0]
    return (
        f"# devtune {scope} {version}, served as {name}: a LoRA adapter over {base_model}.\n"
        f"# FROM must be that exact base model as GGUF ({arch}, {base['num_hidden_layers']} layers, hidden size\n"
        f"# {base['hidden_size']}): a file made by llama.cpp's convert_hf_to_gguf.py from {base_model}, at any\n"
        "# quantization (llama.cpp adds the adapter at run time), or the checkpoint's folder for Ollama to convert.\n"
        "# Another conversion or another model loads this adapter and answers wrongly. If the line below is a\n"
        "# Hugging Face id rather than a path or an Ollama name, replace it; then:\n"
        f"#   ollama create {name} -f Modelfile\n"
        f"FROM {base_model}\n"
        "ADAPTER ./adapter.gguf\n"
    )


def _read_adapter(version_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    config_path, weights = version_dir / "adapter_config.json", version_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise ExportError(f"{version_dir} holds no adapter_config.json and adapter_model.safetensors: pass a "
                          "registry version folder (registry/<scope>/<version>)")
    return json.loads(config_path.read_text()), load_file(str(weights))


def _base_config(base_model: str) -> dict[str, Any]:
    # AutoConfig resolves a local folder and a Hugging Face id (from the local cache) the same way training does.
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base_model)
    except OSError as e:
        raise ExportError(f"cannot read the base model's config from {base_model!r} ({e}): pass the base_model "
                          "the version was trained on, a local folder or a Hugging Face id in the local cache") from e
    values: dict[str, Any] = config.to_dict()
    values.setdefault("num_key_value_heads", values.get("num_attention_heads"))
    return values


def _projection_shapes(base: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection in the base's decoder layers."""
    hidden, heads, kv_heads = base["hidden_size"], base["num_attention_heads"], base["num_key_value_heads"]
    head_dim = base.get("head_dim") or hidden // heads
    inter = base["intermediate_size"]
    return {"q_proj": (heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
            "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def _module_order(module: str) -> tuple[int, int]:
    m = _LORA_KEY.match(f"{module}.lora_A.weight")
    assert m is not None, module
    return int(m.group(2)), list(PROJECTIONS).index(m.group(4))


def _gguf_arch_name(architecture: str) -> str:
    import gguf

    return gguf.MODEL_ARCH_NAMES[GGUF_ARCHITECTURES[architecture].arch]


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "exports.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _remove_stale(out_dir: Path) -> None:
    """Remove the temp folders of exports that were killed (their process is gone)."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.incoming-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(p)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.publish.exports", description=__doc__.splitlines()[0])
    parser.add_argument("version_dir", type=Path, help="registry/<scope>/<version>")
    parser.add_argument("--base-model", help="the base model the servers serve (default: lineage.json's base_model)")
    parser.add_argument("--scope", help="team:NAME or dev:ID (default: lineage.json's scope)")
    parser.add_argument("--version", help="vNNNN (default: lineage.json's version)")
    parser.add_argument("--out", type=Path, help="the exports folder to create (default: VERSION_DIR/exports)")
    args = parser.parse_args(argv)
    lineage_path = args.version_dir / "lineage.json"
    lineage = json.loads(lineage_path.read_text()) if lineage_path.is_file() else {}
    base_model = args.base_model or lineage.get("base_model")
    scope = args.scope or lineage.get("scope")
    version = args.version or lineage.get("version")
    missing = [flag for flag, value in (("--base-model", base_model), ("--scope", scope), ("--version", version))
               if not value]
    if missing:
        parser.error(f"{lineage_path} does not name them: pass {', '.join(missing)}")
    assert base_model and scope and version  # parser.error exits otherwise
    out = args.out or args.version_dir / "exports"
    try:
        manifest = export_version(args.version_dir, base_model, scope, version, out)
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"exported {scope} {version} as {manifest['served_name']} into {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
