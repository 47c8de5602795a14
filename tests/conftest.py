"""Shared fixtures. The embedded model is loaded once per session (from the safetensors cache)."""

import os

import pytest
import torch

torch.manual_seed(0)


@pytest.fixture(scope="session")
def model():
    from headscope.probe import load_model

    return load_model()
