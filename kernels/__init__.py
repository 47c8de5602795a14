"""headscope.kernels: attention that returns per-head statistics without the N x N matrix.

`attention(q, k, v, ..., stats=StatsRequest(...))` dispatches to the fused Triton kernel on CUDA
and to the exact chunked torch path on CPU. This package knows nothing of models.
"""

from .dispatch import attention, triton_available
from .edits import KeyBias, KeyScale
from .errors import BackwardNotSupportedError, HeadscopeError, KernelInputError
from .import_check import refuse_repository_root_on_path
from .reference import attention_reference
from .stats import StatsRequest

refuse_repository_root_on_path()

__all__ = ["attention", "attention_reference", "StatsRequest", "KeyScale", "KeyBias", "HeadscopeError",
           "KernelInputError", "BackwardNotSupportedError", "triton_available"]
