"""fwd+bwd of the public "mean" softmax CE on the CPU, 1 thread: one build (PYTHONPATH), one JSON line."""
import json, sys, torch
from torch.utils import benchmark
import fcn_fast
torch.set_num_threads(1)
out = {"build": sys.argv[1]}
for label, shape in [("caffe500", (1, 21, 500, 500)), ("voc512 N=2", (2, 21, 512, 512))]:
    for dt in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=gen) * 3).to(dt).requires_grad_()
        t = torch.randint(0, 21, (shape[0],) + shape[2:], generator=gen)
        t[torch.rand(t.shape, generator=gen) < 0.05] = 255
        fn = lambda: torch.autograd.grad(fcn_fast.softmax_cross_entropy(x, t, backend="cpu"), x)
        m = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=2)
        out[f"{label} {str(dt)[6:]}"] = round(m.median * 1e3, 3)
print(json.dumps(out))
