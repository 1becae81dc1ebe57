"""mhc_gen: code-generated GPU kernels for mHC (Manifold-Constrained Hyper-Connections).

    import mhc_gen
    u, h_pre, h_post, h_res = mhc_gen.pre_dynamic(x, phi, alpha, b)
    x_next = mhc_gen.post_dynamic(x, y, h_post, h_res)

CUDA/HIP tensors run the kernels that build.py compiled; CPU tensors run
mhc_gen.reference, so the API works on a machine without a GPU.
"""

from __future__ import annotations

from . import library, reference
from ._launch import forced_variant, poisoned_outputs
from ._loader import manifest, table
from ._version import __version__
from .modules import MHCConnection, MHCLayer, expand_streams, reduce_streams, residual_init_bias
from .ops import (
    dynamic_coefficients,
    layer_dynamic,
    layer_static,
    post_dynamic,
    post_static,
    pre_dynamic,
    pre_static,
    static_coefficients,
)
from .select import NoKernelError, select


def kernels(backend: str | None = None) -> list[str]:
    """Names of the compiled variants of one backend (default: every built backend)."""
    backends = [backend] if backend else sorted(manifest().get("modules", {}))
    return sorted(name for b in backends for name in table(b))


__all__ = [
    "MHCConnection",
    "__version__",
    "MHCLayer",
    "expand_streams",
    "reduce_streams",
    "residual_init_bias",
    "NoKernelError",
    "dynamic_coefficients",
    "forced_variant",
    "library",
    "kernels",
    "layer_dynamic",
    "layer_static",
    "post_dynamic",
    "post_static",
    "pre_dynamic",
    "poisoned_outputs",
    "pre_static",
    "reference",
    "select",
    "static_coefficients",
]
