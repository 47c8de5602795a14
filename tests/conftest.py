"""Shared fixtures. The embedded model is loaded once per session (from the safetensors cache)."""

import os

import pytest
import torch

torch.manual_seed(0)


@pytest.fixture(scope="session")
def model():
    from headscope.probe import load_model

    return load_model()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny SAEs: extra threads only add synchronisation cost on a shared 2-core machine (modules
    opt in with pytestmark = pytest.mark.usefixtures("one_torch_thread"))."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
