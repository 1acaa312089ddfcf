"""``python -m jaxalign.sample --model PATH --prompts FILE --output OUT.jsonl [...]``."""

import sys

from jaxalign.sample.cli import main

sys.exit(main())
