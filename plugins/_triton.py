"""Lazy access to Triton: the kernels are optional (the `kernels` extra).

`import arx.plugins` never imports Triton; the `triton_kernel` modules import it at their top
through `require_triton()` so a missing install fails with the extra to install.
"""

from __future__ import annotations

from arx.errors import require


def require_triton():
    """Return the `triton` module or raise MissingDependency naming `pip install 'arx[kernels]'`."""
    return require("triton", "kernels", "The arx Triton kernels")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 << max(0, int(n) - 1).bit_length()
