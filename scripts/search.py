#!/usr/bin/env python
"""DaSS search (see `python scripts/search.py --help`). Submit to a cluster with
`ray job submit --working-dir . -- python scripts/search.py --dataset ... --teacher ... --output ...`."""
import sys
from pathlib import Path

try:
    from dass_ray._deps import require
except ModuleNotFoundError:  # dass_ray is not installed for this python: the checkout's copy says what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dass_ray._deps import require

require()

from dass_ray.search.cli import main

if __name__ == "__main__":
    sys.exit(main())
