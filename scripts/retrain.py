#!/usr/bin/env python
"""Retrain the predictor on a search history (see `python scripts/retrain.py --help`):

    python scripts/retrain.py --history ~/dass-history
    python scripts/search.py --history ~/dass-history --predictor latest --dataset ...
"""
import sys

from dass_ray.offline.retrain import main

if __name__ == "__main__":
    sys.exit(main())
