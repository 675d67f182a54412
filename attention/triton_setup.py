"""Triton, if installed, for the kernel files: triton, tl (None without it), HAS_TRITON, and
INTERPRET (TRITON_INTERPRET=1: kernels run on the CPU in Triton's interpreter; the variable must
be set before triton is first imported)."""

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - no triton installed
    triton, tl = None, None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
