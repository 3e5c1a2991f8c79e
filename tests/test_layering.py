"""The model core imports torch/numpy only: no Ray, no gRPC (STYLE.md 1)."""
import ast
from pathlib import Path

import pytest

CORE = ["space", "nets", "remap", "embed", "predictor", "meta", "data", "kd"]
FORBIDDEN = ("ray", "grpc")
PKG = Path(__file__).resolve().parents[1] / "dass_ray"


@pytest.mark.parametrize("mod", CORE)
def test_core_module_imports_no_ray_or_grpc(mod):
    path = PKG / f"{mod}.py"
    if not path.exists():
        pytest.skip(f"{mod}.py not written yet")
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        for n in names:
            assert n.split(".")[0] not in FORBIDDEN, f"{mod}.py imports {n}"
