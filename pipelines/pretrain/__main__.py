"""`python -m pipelines.pretrain RUN_DIR`: continued pretraining (pipelines/pretrain/cpt.py)."""

import sys

from pipelines.pretrain.cpt import main

sys.exit(main())
