"""Build of the slim client distribution `dass-ray-client` (pyproject.toml here; docs/client.md).

It ships the modules of the `dass_ray` package that the client CLI (`dass_ray.service.cli`) and `SearchClient`
(`dass_ray.service.client`) import when they are imported -- found by following their module-level imports in the
checkout, so the list follows the code -- and the gRPC code generated from proto/ with this build's grpcio-tools.
Its dependencies are grpcio, grpcio-health-checking and protobuf, at least the versions the generated code needs.
`dass-ray serve` and `dass-ray search` need the full package and say so in one line.

Built from a checkout (`pip install ./client`): the files are staged in client/staged/ first. Built from this
distribution's sdist: the staged files it carries are used as they are.
"""
from __future__ import annotations

import ast
import re
import shutil
from importlib import resources
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
STAGE = HERE / "staged"
ROOTS = ("dass_ray.service.cli", "dass_ray.service.client")


def module_file(name: str) -> Path | None:
    base = CHECKOUT.joinpath(*name.split("."))
    for f in (base / "__init__.py", base.with_suffix(".py")):
        if f.is_file():
            return f
    return None  # a name imported from a module (`from m import x`), or not a module of the checkout


def imported_at_import(path: Path) -> set[str]:
    """The dass_ray modules a file imports at module level (also inside try/if; not inside functions)."""
    out: set[str] = set()

    def visit(stmts) -> None:
        for n in stmts:
            if isinstance(n, ast.Import):
                out.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                out.add(n.module)
                out.update(f"{n.module}.{a.name}" for a in n.names)
            elif isinstance(n, (ast.Try, ast.If)):
                visit(n.body)
                visit(n.orelse)
                visit(getattr(n, "finalbody", []))
                for h in getattr(n, "handlers", []):
                    visit(h.body)

    visit(ast.parse(path.read_text()).body)
    return {m for m in out if m.split(".")[0] == "dass_ray"}


def client_modules() -> dict[str, Path]:
    """module name -> file, for the roots, everything they import at import time, and their packages."""
    found: dict[str, Path] = {}
    todo = list(ROOTS)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c first runs a/__init__.py and a/b/__init__.py
            name = ".".join(parts[:i])
            if name in found or "_pb2" in name:  # generated code: made below from the .proto
                continue
            f = module_file(name)
            if f is not None:
                found[name] = f
                todo.extend(imported_at_import(f))
    return found


def stage() -> None:
    from grpc_tools import protoc

    shutil.rmtree(STAGE, ignore_errors=True)
    for f in client_modules().values():
        dest = STAGE / f.relative_to(CHECKOUT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    proto_root = CHECKOUT / "proto"
    protos = sorted(p.relative_to(proto_root).as_posix() for p in (proto_root / "dass_ray").rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={STAGE}",
                      f"--pyi_out={STAGE}", f"--grpc_python_out={STAGE}", *protos])
    if rc != 0:
        raise SystemExit(f"dass-ray-client: protoc failed ({rc}) on {protos}")
    for p in protos:
        init = STAGE / Path(p).parent / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated gRPC code; never edit by hand."""\n')


def floors() -> list[str]:
    """grpcio and protobuf at least as new as the generated code checks for at import."""
    grpc_v = pb_v = None
    for f in (STAGE / "dass_ray").rglob("*_pb2*.py"):
        s = f.read_text()
        grpc_v = grpc_v or (m := re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", s)) and m.group(1)
        pb_v = pb_v or (m := re.search(r"# Protobuf Python Version: ([0-9.]+)", s)) and m.group(1)
    return [f"grpcio>={grpc_v or '1.60'}", f"protobuf>={pb_v or '4.25'}", "grpcio-health-checking>=1.60"]


if (CHECKOUT / "dass_ray" / "service" / "client.py").is_file():
    stage()
elif not (STAGE / "dass_ray").is_dir():
    raise SystemExit("dass-ray-client: build it from a checkout of the project (pip install ./client)")

version = re.search(r'__version__ = "([^"]+)"', (STAGE / "dass_ray" / "__init__.py").read_text()).group(1)
packages = sorted(".".join(p.parent.relative_to(STAGE).parts) for p in STAGE.rglob("__init__.py"))
setup(version=version, install_requires=floors(), packages=packages, package_dir={"": "staged"},
      package_data={p: ["*.pyi"] for p in packages})
