"""Small file helpers shared by the client, the server and the scripts (standard library only: the client
installs without torch or Ray)."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in `chunk`-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def shared_datasets_root() -> Path | None:
    """The shared datasets directory: ``$DASS_DATASETS`` if set, else ``<repo>/../shared/datasets`` if it exists.
    A `$DASS_DATASETS` that is not a directory is a ValueError."""
    env = os.environ.get("DASS_DATASETS")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise ValueError(f"DASS_DATASETS={env!r}: not a directory")
        return p
    p = REPO_ROOT.parent / "shared" / "datasets"
    return p if p.is_dir() else None


STORAGE_ENV = "DASS_RAY_STORAGE"


def resolve_storage(value: str | None, default: Path) -> str:
    """A Tune/Train storage path: a URI as given (checked that pyarrow can open its file system), else an
    absolute local path. Raises ValueError with the reason."""
    value = value or os.environ.get(STORAGE_ENV) or None
    if value is None:
        return str(default.resolve())
    if "://" in value:
        import pyarrow.fs

        try:
            pyarrow.fs.FileSystem.from_uri(value)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError / ValueError depending on the scheme
            raise ValueError(f"{value!r} is not a storage URI this machine can open: {e}") from None
        return value
    return str(Path(value).expanduser().resolve())


def code_version() -> str:
    """git commit of the package's checkout (+ '-dirty'), or the package version when not in git."""
    root = REPO_ROOT
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from dass_ray import __version__

    return f"v{__version__}"
