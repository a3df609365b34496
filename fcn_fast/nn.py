"""nn.Module wrappers of the fused ops (each defined beside its op in fcn_fast.ops)."""

from fcn_fast.ops.cross_entropy import SoftmaxCrossEntropyLoss
from fcn_fast.ops.upsample_add import UpsampleAdd
from fcn_fast.ops.upsample_cross_entropy import UpsampleCrossEntropyLoss

__all__ = ["SoftmaxCrossEntropyLoss", "UpsampleAdd", "UpsampleCrossEntropyLoss"]
