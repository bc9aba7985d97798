"""`python -m pipelines.evaluate RUN_DIR`: score base, served and candidate (see pipelines/evaluate/evaluate.py)."""

import sys

from pipelines.evaluate.evaluate import main

sys.exit(main())
