"""Smoke test of an installed fcn_fast (run by .ci/sdist-smoke.sh from outside the repository, with the venv's
Python): the installed copy is the one imported, its native CPU kernels load, and every op agrees with the
reference backend."""

import os
import sys

import torch

import fcn_fast
from fcn_fast import models

venv = os.path.realpath(sys.argv[1])
assert os.path.realpath(fcn_fast.__file__).startswith(venv), f"imported {fcn_fast.__file__}, not the venv's copy"
status = fcn_fast.available_backends()
assert status["cpu"].available, status["cpu"].reason

gen = torch.Generator().manual_seed(0)
x = torch.randn(2, 5, 9, 11, generator=gen, requires_grad=True)
target = torch.randint(0, 5, (2, 70, 86), generator=gen)
results = {}
for backend in ("reference", "cpu"):
    up = fcn_fast.upsample_add(x, factor=8, mode="deconv", offset=(4, 4), out_size=(70, 86), backend=backend)
    loss = fcn_fast.upsample_cross_entropy(x, target, factor=8, offset=(4, 4), backend=backend)
    (grad,) = torch.autograd.grad(loss + up.square().mean(), x)
    ce = fcn_fast.softmax_cross_entropy(up.detach(), target, backend=backend)
    labels = fcn_fast.upsample_argmax(x.detach(), factor=8, offset=(4, 4), out_size=(70, 86), backend=backend)
    results[backend] = (up.detach(), loss.detach(), grad, ce, labels)
for a, b in zip(results["cpu"], results["reference"]):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

model = models.build("fcn8s_resnet50", num_classes=3, width=1 / 8).eval()
with torch.no_grad():
    assert model.predict(torch.randn(1, 3, 40, 52, generator=gen)).shape == (1, 40, 52)
print(f"sdist-smoke: fcn_fast {fcn_fast.__version__} from {os.path.dirname(fcn_fast.__file__)}: cpu kernels agree "
      f"with the reference")
