"""``python -m tfmq_video`` runs the command line."""

import sys

from tfmq_video.cli import main

sys.exit(main())
