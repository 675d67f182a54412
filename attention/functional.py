"""
Shared attention math as pure functions, used by the modules, the kernels' tests and bench.py.

Shapes: q, k, v are (B, H, T, D); per-head weights are (H,).
"""

import contextlib

import torch
import torch.nn.functional as F

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _BACKENDS = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
        "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
    }
except ImportError:  # pragma: no cover - old torch
    sdpa_kernel, _BACKENDS = None, {}


def backend_context(backend):
    """Context manager that restricts SDPA to one backend ('auto' leaves PyTorch's choice)."""
    if backend == "auto":
        return contextlib.nullcontext()
    if sdpa_kernel is None or _BACKENDS.get(backend) is None:
        raise ValueError(f"sdpa_backend={backend!r} is not available in torch {torch.__version__}")
    return sdpa_kernel(_BACKENDS[backend])


def sdpa_causal(q, k, v, backend="auto", dropout_p=0.0, scale=None):
    """Causal softmax attention (B, H, T, D) -> (B, H, T, Dv), optionally on one forced backend."""
    with backend_context(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
