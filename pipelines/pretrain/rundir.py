"""What a continued-pretraining run directory holds besides a training run's (pipelines/train/rundir.py):

    runs/<run_id>/pretrain.json    {"pretrain": [pretrain] as in the config, "fim": FimShape}: this stage's settings
                  data/cpt.jsonl   the corpus, one file per line (pipelines/pretrain/corpus.py)
                  checkpoints/cpt/ resumable checkpoints (pipelines/train/fit.py)
                  base/            output "base" only: the merged model (pipelines/pretrain/merge.py)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from pipelines.config import PretrainConfig
from pipelines.files import write_json_atomic
from pipelines.pretrain.samples import FimShape


def write_settings(run_dir: Path, cfg: PretrainConfig, fim: FimShape) -> None:
    write_json_atomic(run_dir / "pretrain.json", {"pretrain": asdict(cfg), "fim": asdict(fim)})


def read_settings(run_dir: Path) -> tuple[PretrainConfig, FimShape]:
    data = json.loads((run_dir / "pretrain.json").read_text())
    known = PretrainConfig.__dataclass_fields__
    return PretrainConfig(**{k: v for k, v in data["pretrain"].items() if k in known}), FimShape(**data["fim"])
