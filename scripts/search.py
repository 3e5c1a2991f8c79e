#!/usr/bin/env python
"""DaSS search (see `python scripts/search.py --help`). Submit to a cluster with
`ray job submit --working-dir . -- python scripts/search.py --dataset ... --teacher ... --output ...`."""
import sys

from dass_ray.search.cli import main

if __name__ == "__main__":
    sys.exit(main())
