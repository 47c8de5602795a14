"""Refuse to run when the repository root is on sys.path.

The repository root holds the folders `kernels/` and `circuits/`, installed as `headscope.kernels`
and `headscope.circuits`. Started from the root (`python -m ...`, a REPL or a Jupyter kernel whose
working directory is the root), Python puts the root first on sys.path, and then `import kernels`
finds our folder instead of the PyPI package `kernels` that transformers (>= 5.25) imports when it
loads a model. The failure comes from deep inside transformers ("cannot import name 'CUDAProperties'
from 'kernels'"); this check names the cause instead, before any model is loaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path


def refuse_repository_root_on_path() -> None:
    """Raise ImportError if `import kernels` would load this folder while the PyPI `kernels` is installed."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # nothing to hide
    spec = importlib.util.find_spec("kernels")
    here = Path(__file__).resolve().parent
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != here:
        return
    raise ImportError(
        f"headscope: Python was started in the headscope repository ({here.parent}), so its folder "
        f"`kernels/` hides the PyPI package `kernels` that transformers imports. Start Python from "
        f"another folder (for notebooks: examples/), use the `headscope` command, or run "
        f"`python -P ...` / set PYTHONSAFEPATH=1 (Python >= 3.11), which keep the working directory off "
        f"sys.path.")
