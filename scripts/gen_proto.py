"""Generate the Python gRPC code for proto/dass_ray/v1/*.proto into dass_ray/v1/ (the one generator command).

    python scripts/gen_proto.py          # or: make proto

Run by `make install`. The outputs (`*_pb2.py`, `*_pb2.pyi`, `*_pb2_grpc.py`) are never edited by hand and are
not committed (.gitignore). `-Iproto` makes the generated imports read `from dass_ray.v1 import search_pb2`.
"""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

try:
    from dass_ray._deps import require
except ModuleNotFoundError:  # dass_ray is not installed for this python: the checkout's copy says what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dass_ray._deps import require

require("grpc_tools", what="scripts/gen_proto.py (make proto)")

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"


def main() -> int:
    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in (PROTO_ROOT / "dass_ray").rglob("*.proto"))
    if not protos:
        print(f"gen_proto: no .proto files under {PROTO_ROOT}", file=sys.stderr)
        return 1
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={ROOT}",
            f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", *protos]
    rc = protoc.main(args)
    if rc != 0:
        print(f"gen_proto: protoc failed ({rc}) on {protos}", file=sys.stderr)
        return 1
    for p in protos:  # every generated package directory needs an __init__.py to import
        pkg = ROOT / Path(p).parent
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated gRPC code (scripts/gen_proto.py); never edit by hand."""\n')
    print(f"gen_proto: generated {', '.join(protos)} into {ROOT / 'dass_ray'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
