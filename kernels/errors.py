"""Exception types. Every error headscope raises on bad input derives from `HeadscopeError`."""


class HeadscopeError(Exception):
    """Base class of all headscope errors: catch this to handle any of them."""


class KernelInputError(HeadscopeError, ValueError):
    """Tensors or options given to `headscope.kernels.attention` do not fit together."""


class BackwardNotSupportedError(HeadscopeError, RuntimeError):
    """Gradients were requested through the fused kernel, which has no backward."""
