"""`python -m pipelines.train RUN_DIR`: train the run's adapter (see pipelines/train/train.py)."""

import sys

from pipelines.train.train import main

sys.exit(main())
