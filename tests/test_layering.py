"""The package's layers (README "Code layout"): what each layer may import, checked on the source and in fresh
interpreters. From the bottom up:

- `dass_ray.contract`: the search contract (knobs, stages, result format, the exported student's `InputSpec`);
  standard library only, so every layer may import it and it loads neither torch nor Ray.
- `dass_ray.core`: the model math, plain PyTorch/numpy. No Ray, no gRPC, nothing from the other layers except the
  contract.
- `dass_ray.offline`: meta-dataset building and meta-training; the product (search, service) never imports it.
- `dass_ray.search`: the search on Ray.
- `dass_ray.service`: server, jobs, client and CLI, on top; neither torch nor Ray is imported by the server or the
  client. No layer below it (core, offline, search, the contract) imports it.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dass_ray"
LAYERS = {
    "core": ["adapters", "config", "data", "embed", "export", "foreign", "images", "kd", "meta", "nets", "posterior",
             "predictor", "proxies", "ranking", "remap", "rows", "space", "tasks"],
    "offline": ["labelgen", "metadataset", "metatrain", "metatrain_ray", "plans", "retrain"],
    "search": ["cli", "history", "inputs", "proxy", "rayutil", "report", "resources", "run", "scoring", "searcher",
               "softlabels", "trainable"],
    "service": ["checks", "cli", "client", "jobs/backends", "jobs/events", "jobs/launch", "jobs/rayhead",
                "jobs/runner", "jobs/store", "server/app", "server/rpc", "server/servicer", "server/uploads"],
}
RAY_FREE = ([f"core.{m}" for m in LAYERS["core"]] + ["offline.plans", "offline.metadataset", "offline.metatrain"]
            + [f"service.{m.replace('/', '.')}" for m in LAYERS["service"]]
            + ["contract", "fileutil", "cluster_config"])
TORCH_FREE = ["contract", "service.client", "service.cli", "service.server", "service.jobs", "fileutil", "_deps"]


def imports(path: Path) -> list[str]:
    """Every module `path` imports, anywhere in the file (function-level imports too). `from X import Y` counts as
    X and X.Y (Y may be a module: `from dass_ray import service`); relative imports are resolved to absolute names."""
    package = ".".join(("dass_ray",) + path.relative_to(PKG).parent.parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out.append(base)
            out += [f"{base}.{a.name}" for a in node.names if a.name != "*"]
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
            assert name.startswith(("dass_ray.core", "dass_ray.fileutil", "dass_ray.contract")) or name in (
                "dass_ray", "dass_ray.__version__"), f"core/{mod}.py imports {name}"


def _py_files(*where: str) -> list[Path]:
    return sorted(p for w in where for p in ([PKG / w] if w.endswith(".py") else (PKG / w).rglob("*.py")))


@pytest.mark.parametrize("path", _py_files("core", "offline", "search", "contract.py"),
                         ids=lambda p: str(p.relative_to(PKG)))
def test_layers_below_the_service_do_not_import_it(path):
    """The contract sits below core and search (issue 29, item 8): nothing under the service imports upward."""
    bad = [n for n in imports(path) if n == "dass_ray.service" or n.startswith("dass_ray.service.")]
    assert not bad, f"{path.relative_to(PKG)} imports {bad}: the service is the top layer (contract: dass_ray.contract)"


def test_the_contract_imports_only_the_standard_library():
    mods = imports(PKG / "contract.py")
    assert mods, "dass_ray/contract.py: no imports found (moved?)"
    bad = [n for n in mods if n.split(".")[0] not in sys.stdlib_module_names and n != "__future__"
           and not n.startswith("__future__.")]
    assert not bad, f"dass_ray/contract.py imports {bad}"


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
