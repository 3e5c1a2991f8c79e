"""The model core imports torch/numpy only: no Ray, no gRPC (STYLE.md 1)."""
import ast
from pathlib import Path

import pytest

CORE = ["space", "nets", "remap", "embed", "predictor", "meta", "data", "kd", "export"]
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


def test_actor_module_stays_light():
    """Encoder/predictor actor processes import `dass_ray.scoring`: no Tune, Train, pyarrow or pandas there."""
    import subprocess
    import sys

    code = ("import sys, dass_ray.scoring; "
            "print(','.join(m for m in ('ray.tune', 'ray.train', 'pyarrow', 'pandas', 'grpc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"dass_ray.scoring pulls in {out}"
