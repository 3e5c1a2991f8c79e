#!/usr/bin/env python
"""Retrain the predictor on a search history (see `python scripts/retrain.py --help`):

    python scripts/retrain.py --history ~/dass-history
    python scripts/search.py --history ~/dass-history --predictor latest --dataset ...
"""
import sys
from pathlib import Path

try:
    from dass_ray._deps import require
except ModuleNotFoundError:  # dass_ray is not installed for this python: the checkout's copy says what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dass_ray._deps import require

require()

from dass_ray.offline.retrain import main

if __name__ == "__main__":
    sys.exit(main())
