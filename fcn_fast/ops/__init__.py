"""The fused ops: one module per op (public function, reference, dispatch, torch.library registration)."""

from fcn_fast.ops.cross_entropy import SoftmaxCrossEntropyLoss, softmax_cross_entropy
from fcn_fast.ops.upsample_add import UpsampleAdd, upsample_add, upsample_add_reference
from fcn_fast.ops.upsample_cross_entropy import UpsampleCrossEntropyLoss, upsample_argmax, upsample_cross_entropy

__all__ = [
    "SoftmaxCrossEntropyLoss", "UpsampleAdd", "UpsampleCrossEntropyLoss", "softmax_cross_entropy", "upsample_add",
    "upsample_add_reference", "upsample_argmax", "upsample_cross_entropy",
]
