"""``python -m lakd`` (what torchrun launches)."""
import sys

from .cli.main import main

sys.exit(main())
