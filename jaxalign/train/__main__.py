"""``python -m jaxalign.train --config configs/X.py [--workdir DIR] [--config.KEY=VALUE ...]``."""

import sys

from jaxalign.train.cli import main

sys.exit(main(reexec=True))
