"""`python -m bench` from the repository root (or `python -m carousel.bench`)."""

import sys

from .cli import main

sys.exit(main())
