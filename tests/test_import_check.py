"""Started in the repository root, `import kernels` would find our folder, not the PyPI package that
transformers imports: headscope refuses with a message that names the cause."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import_from(cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run([sys.executable, *flags, "-c", "import headscope.kernels"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _pypi_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_repository_root_on_path_is_refused_by_name():
    r = _import_from(ROOT)
    if _pypi_kernels_installed():
        assert r.returncode != 0
        assert "hides the PyPI package `kernels`" in r.stderr, r.stderr
    else:  # nothing is hidden: the import must work
        assert r.returncode == 0, r.stderr


def test_import_works_elsewhere(tmp_path):
    r = _import_from(tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P is new in 3.11")
def test_safe_path_in_the_root_works():
    r = _import_from(ROOT, "-P")
    assert r.returncode == 0, r.stderr
