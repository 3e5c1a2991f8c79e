"""The package's layers (README "Layout"): what each layer may import, checked on the source and in fresh
interpreters.

- `dass_ray.core`: the model math, plain PyTorch/numpy. No Ray, no gRPC, nothing from the other layers except the
  torch-free search contract (`dass_ray.service.contract`: the exported student's `InputSpec`).
- `dass_ray.offline`: meta-dataset building and meta-training; the product (search, service) never imports it.
- `dass_ray.search`: the search on Ray. `dass_ray.service`: the contract, server, jobs, client and CLI; neither
  torch nor Ray is imported by the server, the client or the contract.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dass_ray"
LAYERS = {
    "core": ["adapters", "config", "data", "embed", "export", "images", "kd", "meta", "nets", "predictor",
             "proxies", "ranking", "remap", "rows", "space", "tasks"],
    "offline": ["labelgen", "metadataset", "metatrain", "metatrain_ray", "plans", "retrain"],
    "search": ["cli", "history", "inputs", "rayutil", "report", "resources", "run", "scoring", "searcher",
               "trainable"],
    "service": ["checks", "cli", "client", "contract", "jobs/backends", "jobs/events", "jobs/launch", "jobs/rayhead",
                "jobs/runner", "jobs/store", "server/app", "server/rpc", "server/servicer", "server/uploads"],
}
RAY_FREE = ([f"core.{m}" for m in LAYERS["core"]] + ["offline.plans", "offline.metadataset", "offline.metatrain"]
            + [f"service.{m.replace('/', '.')}" for m in LAYERS["service"]] + ["fileutil", "cluster_config"])
TORCH_FREE = ["service.contract", "service.client", "service.cli", "service.server", "service.jobs", "fileutil"]


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append(node.module or "")
    return out


def test_every_listed_module_exists_and_none_is_unlisted():
    for layer, mods in LAYERS.items():
        have = {str(p.relative_to(PKG / layer).with_suffix("")) for p in (PKG / layer).rglob("*.py")
                if p.name != "__init__.py"}
        assert have == set(mods), f"dass_ray/{layer}: unlisted {sorted(have - set(mods))}, " \
                                  f"missing {sorted(set(mods) - have)}"


@pytest.mark.parametrize("mod", LAYERS["core"])
def test_core_imports_only_core(mod):
    for name in imports(PKG / "core" / f"{mod}.py"):
        top = name.split(".")[0]
        assert top not in ("ray", "grpc"), f"core/{mod}.py imports {name}"
        if top == "dass_ray":
            assert name.startswith(("dass_ray.core", "dass_ray.fileutil")) or name in (
                "dass_ray", "dass_ray.service.contract"), f"core/{mod}.py imports {name}"


@pytest.mark.parametrize("layer", ["search", "service"])
def test_the_product_does_not_import_the_offline_pipeline(layer):
    for path in (PKG / layer).rglob("*.py"):
        bad = [n for n in imports(path) if n.startswith("dass_ray.offline")]
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def _loaded(modules: list[str], watch: tuple[str, ...]) -> str:
    code = (f"import sys\nfor m in {modules!r}: __import__('dass_ray.' + m)\n"
            f"print(','.join(m for m in {watch!r} if m in sys.modules))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_ray_free_modules_do_not_load_ray():
    assert _loaded(RAY_FREE, ("ray",)) == ""


def test_service_front_modules_load_neither_torch_nor_ray():
    assert _loaded(TORCH_FREE, ("torch", "ray")) == ""


def test_actor_module_stays_light():
    """Encoder/predictor actor processes import `dass_ray.search.scoring`: no Tune, Train, pyarrow or pandas."""
    assert _loaded(["search.scoring"], ("ray.tune", "ray.train", "pyarrow", "pandas", "grpc")) == ""
