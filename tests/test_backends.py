"""Backend selection and dispatch: the registry, the order of the choices (argument, use_backend, FCN_FAST_BACKEND,
default), use_backend per thread and task, the same choice under torch.compile and torch.export, and a backend
being one registry entry that every op runs."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import threading

import pytest
import torch

import fcn_fast
from fcn_fast import _backends, models
from harness import HAS_CUDA

OP_MODULES = [importlib.import_module(f"fcn_fast.ops.{name}")
              for name in ("upsample_add", "cross_entropy", "upsample_cross_entropy")]
UPSAMPLE_ADD = OP_MODULES[0]
HAS_CPU = bool(_backends.available_backends()["cpu"])
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason=_backends.available_backends()["cpu"].reason)
TINY = 1 / 32


class _Recording:
    """A backend's upsample_add implementation that notes each forward (and still runs it)."""

    def __init__(self, name, kernels, calls):
        self.name, self.kernels, self.calls = name, kernels, calls

    def __getattr__(self, attr):
        return getattr(self.kernels, attr)

    def forward(self, *args):
        self.calls.append(self.name)
        return self.kernels.forward(*args)


@pytest.fixture
def record_backend(monkeypatch):
    """The backend of each upsample_add forward, eager or compiled (the real implementation runs)."""
    calls = []
    for name in ("reference", "cpu"):
        monkeypatch.setitem(UPSAMPLE_ADD.KERNELS, name, _Recording(name, UPSAMPLE_ADD.KERNELS[name], calls))
    monkeypatch.delenv("FCN_FAST_BACKEND", raising=False)
    return calls


def test_available_backends():
    status = fcn_fast.available_backends()
    assert list(status) == ["reference", "cpu", "cuda", "triton", "cuda_emulated"]
    assert status["reference"].available
    for name, s in status.items():
        assert s.name == name and isinstance(s.reason, str) and s.reason
    if not HAS_CUDA:
        assert not status["cuda"] and "CUDA" in status["cuda"].reason


def test_every_op_implements_every_backend():
    for module in OP_MODULES:
        for name, entry in _backends.REGISTRY.items():
            assert entry.kernels in module.KERNELS.implementations, (module.__name__, name)


def test_backend_selection(record_backend, monkeypatch):
    x = torch.randn(1, 2, 3, 3)
    fcn_fast.upsample_add(x, factor=2)
    assert record_backend[-1] == ("cpu" if HAS_CPU else "reference")
    with fcn_fast.use_backend("reference"):
        fcn_fast.upsample_add(x, factor=2)
        assert record_backend[-1] == "reference"
        if HAS_CPU:
            fcn_fast.upsample_add(x, factor=2, backend="cpu")  # the argument wins over the block
            assert record_backend[-1] == "cpu"
    monkeypatch.setenv("FCN_FAST_BACKEND", "reference")
    fcn_fast.upsample_add(x, factor=2)
    assert record_backend[-1] == "reference"
    if HAS_CPU:
        with fcn_fast.use_backend("cpu"):  # the block wins over the environment
            fcn_fast.upsample_add(x, factor=2)
            assert record_backend[-1] == "cpu"
            with fcn_fast.use_backend(None):  # back to the automatic choice: the environment
                fcn_fast.upsample_add(x, factor=2)
                assert record_backend[-1] == "reference"
            fcn_fast.upsample_add(x, factor=2)
            assert record_backend[-1] == "cpu"


def test_unavailable_or_unknown_backend():
    x = torch.randn(1, 2, 3, 3)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match=r"backend 'cuda' is unavailable here.*Usable on cpu: reference"):
            fcn_fast.upsample_add(x, factor=2, backend="cuda")
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'.*reference, cpu, cuda, triton"):
        fcn_fast.upsample_add(x, factor=2, backend="tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with fcn_fast.use_backend("fast"):
            pass


def _selected_here(device=torch.device("cpu")):
    return _backends.resolve_backend(None, device, "test")


@needs_cpu
def test_use_backend_is_per_thread(monkeypatch):
    monkeypatch.delenv("FCN_FAST_BACKEND", raising=False)
    inside, seen = threading.Barrier(2), {}

    def in_block():
        with fcn_fast.use_backend("reference"):
            inside.wait()
            seen["block"] = _selected_here()
            inside.wait()

    def outside():
        inside.wait()  # while the other thread is in its block
        seen["outside"] = _selected_here()
        inside.wait()

    threads = [threading.Thread(target=in_block), threading.Thread(target=outside)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert seen == {"block": "reference", "outside": "cpu"}
    assert _selected_here() == "cpu"


@needs_cpu
def test_use_backend_is_per_task(monkeypatch):
    monkeypatch.delenv("FCN_FAST_BACKEND", raising=False)

    async def main():
        entered = asyncio.Event()
        release = asyncio.Event()

        async def in_block():
            with fcn_fast.use_backend("reference"):
                entered.set()
                await release.wait()
                return _selected_here()

        async def outside():
            await entered.wait()
            seen = _selected_here()
            release.set()
            return seen

        return await asyncio.gather(in_block(), outside())

    assert asyncio.run(main()) == ["reference", "cpu"]


@needs_cpu
def test_compiled_code_follows_the_block_around_its_call(record_backend):
    x = torch.randn(1, 2, 3, 3)
    compiled = torch.compile(lambda t: fcn_fast.upsample_add(t, factor=2), fullgraph=True, backend="eager")
    expected = fcn_fast.upsample_add(x, factor=2, backend="reference")
    record_backend.clear()
    with fcn_fast.use_backend("reference"):
        torch.testing.assert_close(compiled(x), expected)
    torch.testing.assert_close(compiled(x), expected)  # a new block value: recompiled, not the traced choice
    with fcn_fast.use_backend("reference"):
        compiled(x)
    assert record_backend == ["reference", "cpu", "reference"]


def _fcn8s():
    model = models.build("fcn8s", width=TINY, dropout=0.0).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("score_"):  # non-zero scorers: the built ones are zero
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _fused_backends(graph_module):
    """The backend argument of every fcn_fast op in an exported graph (and the graphs it nests: no_grad blocks)."""
    return {node.args[-1] for module in graph_module.modules() if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes if node.op == "call_function" and "fcn_fast." in str(node.target)}


class _Labels(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.predict(x)


@pytest.mark.parametrize("selection", ["default", "use_backend"])
def test_fcn8s_exports_with_the_chosen_backend(selection, monkeypatch):
    """torch.export of FCN-8s's logits and labels (its fused upsample_add and upsample_argmax) keeps the backend of
    the default order or of the block around the export, and runs anywhere after it."""
    monkeypatch.delenv("FCN_FAST_BACKEND", raising=False)
    model, x = _fcn8s(), torch.randn(1, 3, 20, 24)
    with fcn_fast.use_backend("reference"):
        expected, expected_labels = model(x), model.predict(x)
    want = "cpu" if selection == "default" and HAS_CPU else "reference"
    with fcn_fast.use_backend("reference") if selection == "use_backend" else contextlib.nullcontext():
        exported = [torch.export.export(m, (x,)) for m in (model, _Labels(model))]
    for program in exported:
        assert _fused_backends(program.graph_module) == {want}
    torch.testing.assert_close(exported[0].module()(x), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(exported[1].module()(x), expected_labels)


def test_fcn8s_compiles_fullgraph_on_the_default_backend(monkeypatch):
    """torch.compile(fullgraph=True) of FCN-8s with the backend of the default order (tests/test_models.py compiles
    it, and a training step, inside a use_backend block)."""
    monkeypatch.delenv("FCN_FAST_BACKEND", raising=False)
    model, x = _fcn8s(), torch.randn(1, 3, 20, 24)
    with fcn_fast.use_backend("reference"):
        expected = model(x)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), expected,
                               rtol=1e-4, atol=1e-5)


@needs_cpu
def test_a_backend_is_one_registry_entry(monkeypatch):
    """A second entry running the CPU implementations through the same torch.ops namespace: every op runs it and
    gives the CPU backend's bits, forward and backward, with no op module changed (as a backend built from the same
    sources into another namespace would)."""
    monkeypatch.setitem(_backends.REGISTRY, "cpu_twin", _backends.Backend(
        "cpu_twin", kernels="cpu", namespace="fcn_fast", devices=("cpu",), error=_backends.REGISTRY["cpu"].error,
        runs="the CPU kernels again"))
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(2, 4, 5, 6, generator=gen)
    target = torch.randint(0, 4, (2, 10, 12), generator=gen)
    calls = {
        "upsample_add": lambda c, b: fcn_fast.upsample_add(c, factor=2, mode="deconv", out_size=(10, 12),
                                                           backend=b).square().sum(),
        "softmax_cross_entropy": lambda c, b: fcn_fast.softmax_cross_entropy(c, target[:, :5, :6], backend=b),
        "upsample_cross_entropy": lambda c, b: fcn_fast.upsample_cross_entropy(c, target, factor=2, backend=b),
    }
    try:
        for name, call in calls.items():
            results = []
            for b in ("cpu", "cpu_twin"):
                c = coarse.clone().requires_grad_()
                loss = call(c, b)
                loss.backward()
                results.append((loss.detach(), c.grad))
            assert all(torch.equal(a, b) for a, b in zip(*results)), name
        labels = [fcn_fast.upsample_argmax(coarse, factor=2, out_size=(10, 12), backend=b) for b in ("cpu", "cpu_twin")]
        assert torch.equal(*labels)
        assert type(UPSAMPLE_ADD.KERNELS["cpu_twin"]) is type(UPSAMPLE_ADD.KERNELS["cpu"])
    finally:
        for module in OP_MODULES:
            module.KERNELS.pop("cpu_twin", None)
