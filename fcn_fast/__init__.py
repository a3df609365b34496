"""fcn_fast: fused CPU/CUDA/Triton kernels for the head of Fully Convolutional Networks, and the FCN family.

Ops: upsample_add, softmax_cross_entropy, upsample_cross_entropy, upsample_argmax (each with backend="reference",
"cpu", "cuda" or "triton"; see available_backends() and use_backend()).
"""

from fcn_fast._requirements import check_torch

check_torch()  # before the extension, which is built against one torch and may not load into an older one

from fcn_fast import _extension  # noqa: E402,F401  (loads the native kernels first, if built)
from fcn_fast import nn  # noqa: E402,F401
from fcn_fast._backends import BACKENDS, available_backends, use_backend  # noqa: E402
from fcn_fast.ops import softmax_cross_entropy, upsample_add, upsample_argmax, upsample_cross_entropy  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "available_backends", "softmax_cross_entropy", "upsample_add", "upsample_argmax",
    "upsample_cross_entropy", "use_backend", "__version__",
]
