"""A small run of every op on one backend (default cuda), forward and backward on odd shapes, against the reference
backend: short enough to run under compute-sanitizer (benchmarks/gpu_session.sh). Exits 1 on a mismatch.

    python -m benchmarks.cuda_smoke [cuda|triton|cpu|reference] [small]   (cpu and reference run on the CPU)

"small": the odd-shaped case (crop offsets, 5 classes) in float32 only, for racecheck, which is slow.
"""

import sys

import torch

import fcn_fast
from fcn_fast.bench.measure import float32_as_float32

CASES = [  # (N, C, coarse h, w, factor, out H, W, offset)
    (1, 21, 16, 16, 2, 34, 34, (0, 0)),
    (2, 5, 7, 13, 8, 50, 99, (3, 5)),
    (1, 3, 1, 1, 8, 16, 16, (0, 0)),
]
DTYPES = (torch.float32, torch.bfloat16)


def main(backend: str, small: bool = False) -> int:
    with float32_as_float32():  # the float32 references' F.conv_transpose2d must not run in TF32 (1e-4 below)
        return _check(backend, CASES[1:2] if small else CASES, (torch.float32,) if small else DTYPES)


def _check(backend: str, cases, dtypes) -> int:
    device = torch.device("cuda" if backend in ("cuda", "triton") else "cpu")
    gen = torch.Generator().manual_seed(0)
    failures = 0
    for dtype in dtypes:
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for n, c, h, w, f, H, W, off in cases:
            coarse = torch.randn(n, c, h, w, generator=gen).to(device, dtype)
            skip = torch.randn(n, c, H + 3, W + 2, generator=gen).to(device, dtype)
            target = torch.randint(0, c, (n, H, W), generator=gen).to(device)
            target[:, ::7] = 255
            calls = {
                "upsample_add": lambda b, x, s: fcn_fast.upsample_add(
                    x, s, factor=f, mode="deconv", out_size=(H, W), offset=off, skip_offset=(2, 1), backend=b),
                "softmax_cross_entropy": lambda b, x, s: fcn_fast.softmax_cross_entropy(
                    fcn_fast.upsample_add(x, factor=f, mode="deconv", out_size=(H, W), offset=off, backend="reference"),
                    target, backend=b),
                "upsample_cross_entropy": lambda b, x, s: fcn_fast.upsample_cross_entropy(
                    x, target, factor=f, offset=off, backend=b),
            }
            for name, call in calls.items():
                got = []
                for b in (backend, "reference"):
                    x = coarse.clone().requires_grad_(True)
                    s = skip.clone().requires_grad_(True)
                    out = call(b, x, s)
                    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)  # same for both
                    grads = torch.autograd.grad(out, (x, s), upstream, allow_unused=True)
                    got.append([out] + [g for g in grads if g is not None])
                for a, r in zip(*got):
                    err = ((a.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)).item()
                    if not err <= tol:
                        failures += 1
                        print(f"MISMATCH {name} {dtype} N={n} C={c} {h}x{w} x{f}: rel err {err:.2e}")
            labels = fcn_fast.upsample_argmax(coarse, factor=f, out_size=(H, W), offset=off, backend=backend)
            ref = fcn_fast.upsample_add(coarse.float(), factor=f, mode="deconv", out_size=(H, W), offset=off,
                                        backend="reference").argmax(1)
            if dtype == torch.float32 and (labels != ref).float().mean().item() > 1e-3:
                failures += 1
                print(f"MISMATCH upsample_argmax N={n} C={c} {h}x{w} x{f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"cuda_smoke[{backend}]: {'OK' if not failures else f'{failures} mismatches'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda", small="small" in sys.argv[2:]))
