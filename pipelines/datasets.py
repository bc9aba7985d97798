"""Every dataset of one scope, written into one folder: the files a run directory's data/ holds.

This is the single entry point the cycle and `devtune dataset build` call; each signal has its own
module (sft.py today). The file formats are the contract with training and evaluation, documented in
pipelines/rundir.py.
"""

from __future__ import annotations

from pathlib import Path

from daemon.config import DatasetsConfig
from pipelines.scope import Scope
from pipelines.sft import DatasetReport, build_sft
from pipelines.store import Store
from pipelines.tokens import BaseTokenizer


def build_datasets(store: Store, scope: Scope, cfg: DatasetsConfig, tokenizer: BaseTokenizer,
                   out_dir: Path) -> DatasetReport:
    """Write the scope's datasets and manifest.json into `out_dir`; `report.skipped` says why not, if not."""
    return build_sft(store, scope, cfg, tokenizer, out_dir)
