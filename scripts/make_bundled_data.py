#!/usr/bin/env python3
"""Copy the bundled datasets from the shared datasets directory into dass_ray/assets/data, verifying sha256.

Usage: python scripts/make_bundled_data.py [--shared /path/to/shared/datasets]
The files are copied unchanged; see dass_ray/assets/data/PROVENANCE.md.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEST = REPO / "dass_ray" / "assets" / "data"
FILES = {  # bundled name -> (path under the shared datasets root, sha256)
    "mnist5k.parquet": ("mnist5k/all.parquet",
                        "ca9ee729da448a3599c67b766357fbb2c2db2e9f5138305ae5f84e9f6ad0de51"),
    "omniglot_small.parquet": ("omniglot_small/all.parquet",
                               "51e67df6934138930111c254fbaeaeb092ed7f37e91aefe6272c4b9461a6482e"),
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "datasets")
    args = ap.parse_args(argv)
    DEST.mkdir(parents=True, exist_ok=True)
    for name, (rel, digest) in FILES.items():
        src = args.shared / rel
        if sha256(src) != digest:
            print(f"{src}: sha256 mismatch (expected {digest})", file=sys.stderr)
            return 1
        shutil.copyfile(src, DEST / name)
        assert sha256(DEST / name) == digest
        print(f"{DEST / name}: ok {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
