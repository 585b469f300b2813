"""``python -m pipelines.train RUN_DIR``: the training job (see pipelines/train/job.py)."""

import sys

from pipelines.train.job import main

sys.exit(main())
