"""The foundation every op stands on: tap tables against PyTorch, the Caffe filler, import without the extension."""

import os
import re
import subprocess
import sys

import pytest
import torch

import fcn_fast
from fcn_fast.ops._resample import (Geometry, bilinear_filler_1d, bilinear_kernel, deconv_kernel_size,
                                    deconv_output_size, upsample_reference)
from pipeline_helpers import REPO


def _apply_taps(x: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Bilinear resampling from the tap tables alone, as the kernels read them."""
    rows, cols = geometry.taps(x.device, x.dtype)
    ri, rw, ci, cw = rows.index.long(), rows.weight, cols.index.long(), cols.weight
    out = torch.zeros(*x.shape[:2], *geometry.out_hw, dtype=x.dtype)
    for a in range(2):
        for b in range(2):
            out += x[:, :, ri[:, a]][:, :, :, ci[:, b]] * rw[:, a][:, None] * cw[:, b][None, :]
    return out


def _gather_from_readers(grad: torch.Tensor, geometry: Geometry, in_hw) -> torch.Tensor:
    """The adjoint computed the way backward kernels do: each input sums the outputs in its readers ranges."""
    rows, cols = geometry.taps(grad.device, grad.dtype)

    def axis_matrix(taps, in_size):
        m = torch.zeros(in_size, taps.index.shape[0], dtype=grad.dtype)
        for i in range(in_size):
            start, stop = taps.readers[i].tolist()
            for o in range(start, stop):
                for k in range(2):
                    if taps.index[o, k] == i:
                        m[i, o] += taps.weight[o, k]
        return m

    return axis_matrix(rows, in_hw[0]) @ grad @ axis_matrix(cols, in_hw[1]).T


GEOMETRIES = [
    Geometry("deconv", (1, 1), (4, 4), 2, (0, 0), False),
    Geometry("deconv", (7, 13), (12, 20), 2, (1, 5), False),
    Geometry("deconv", (5, 4), (30, 25), 8, (3, 2), False),
    Geometry("deconv", (3, 3), (5, 5), 3, (2, 1), False),
    Geometry("deconv", (2, 3), (40, 70), 32, (19, 19), False),
    Geometry("deconv", (6, 5), (6, 5), 1, (0, 0), False),
    Geometry("interp", (7, 13), (14, 26), 2, (0, 0), False),
    Geometry("interp", (7, 13), (17, 29), 2, (0, 0), True),
    Geometry("interp", (1, 1), (8, 8), 8, (0, 0), False),
    Geometry("interp", (9, 8), (4, 3), 1, (0, 0), False),
    Geometry("interp", (9, 8), (1, 1), 1, (0, 0), True),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g.mode}-{g.in_hw}-{g.out_hw}-f{g.factor}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tap_tables_equal_pytorch(geometry, dtype):
    x = torch.randn(2, 3, *geometry.in_hw, dtype=dtype)
    expected = upsample_reference(x, geometry)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(_apply_taps(x, geometry), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g.mode}-{g.in_hw}-{g.out_hw}-f{g.factor}")
def test_readers_ranges_give_the_adjoint(geometry):
    grad = torch.randn(*geometry.out_hw, dtype=torch.float64)
    x = torch.zeros(1, 1, *geometry.in_hw, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(upsample_reference(x, geometry), x, grad[None, None])
    torch.testing.assert_close(_gather_from_readers(grad, geometry, geometry.in_hw), expected[0, 0])


def test_tap_indices_stay_in_bounds():
    for g in GEOMETRIES:
        rows, cols = g.taps(torch.device("cpu"), torch.float32)
        for taps, size in ((rows, g.in_hw[0]), (cols, g.in_hw[1])):
            assert int(taps.index.min()) >= 0 and int(taps.index.max()) < size
            assert int(taps.readers.min()) >= 0 and int(taps.readers.max()) <= taps.index.shape[0]


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8, 16, 32])
def test_caffe_bilinear_filler(factor):
    size = deconv_kernel_size(factor)
    assert size == 2 * factor - factor % 2
    f = (size + 1) // 2
    center = f - 1 if size % 2 == 1 else f - 0.5
    expected = torch.tensor([1 - abs(k - center) / f for k in range(size)], dtype=torch.float64)
    torch.testing.assert_close(bilinear_filler_1d(size), expected)
    weight = bilinear_kernel(3, factor, diagonal=True)
    assert weight.shape == (3, 3, size, size)
    assert torch.equal(weight[0, 1], torch.zeros(size, size))
    torch.testing.assert_close(weight[2, 2].double(), expected[:, None] * expected[None, :], rtol=1e-6, atol=1e-7)
    assert deconv_output_size(10, factor) == 9 * factor + size


def test_build_info_reports_what_was_compiled():
    info = fcn_fast._extension.build_info()
    if fcn_fast._extension.load_error() is None:
        assert set(info) >= {"cuda", "openmp"}
        assert info["openmp"], "the CPU kernels must be built with OpenMP"
    status = fcn_fast.available_backends()
    assert status["reference"].available
    assert set(status) == set(fcn_fast.BACKENDS)


def test_import_works_without_the_extension():
    """A broken or missing fcn_fast._C leaves the reference backend working and says why the others are off; and
    importing fcn_fast does not import triton (the Triton implementations are imported on first use)."""
    code = (
        "import sys; sys.modules['fcn_fast._C'] = None\n"
        "import torch, fcn_fast\n"
        "assert 'triton' not in sys.modules, 'importing fcn_fast imported triton'\n"
        "s = fcn_fast.available_backends()\n"
        "assert not s['cpu'].available and 'could not be loaded' in s['cpu'].reason, s['cpu']\n"
        "x = torch.randn(1, 2, 3, 3)\n"
        "y = fcn_fast.upsample_add(x, factor=2, mode='deconv')\n"
        "assert y.shape == (1, 2, 8, 8), y.shape\n"
        "try:\n"
        "    fcn_fast.upsample_add(x, factor=2, backend='cpu')\n"
        "except ValueError as e:\n"
        "    assert 'reference' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error for an unavailable backend')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_older_torch_is_refused_at_import_with_what_was_found_and_what_is_needed():
    floor = ".".join(map(str, fcn_fast._requirements.TORCH_FLOOR))
    older = f"{fcn_fast._requirements.TORCH_FLOOR[0]}.{fcn_fast._requirements.TORCH_FLOOR[1] - 1}.3"
    code = f"import torch; torch.__version__ = {older!r}; import fcn_fast"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fcn_fast needs torch >= " + floor), last
    assert f"found torch {older}" in last, last
    for version in (floor + ".0", floor + ".0a0+git1234", "3.0.0", torch.__version__):
        fcn_fast._requirements.check_torch(version)


def test_a_triton_interpreter_that_cannot_run_with_this_numpy_makes_the_backend_unavailable():
    """Triton before 3.7 interprets loop bounds through int() on one-element arrays, which numpy 2.4 refuses: the
    backend says so, naming both remedies, instead of failing inside a kernel."""
    check = fcn_fast._requirements.triton_interpreter_error
    assert check("3.6.0", "2.3.5") is None and check("3.7.0", "2.4.6") is None and check("3.8.0+git1", "2.4.0") is None
    message = check("3.6.0", "2.4.1")
    assert "Triton 3.6.0" in message and "numpy 2.4.1" in message
    assert "pip install 'numpy<2.4' or 'triton>=3.7'" in message
    if fcn_fast._backends._triton_import_error():
        pytest.skip(fcn_fast._backends._triton_import_error())
    # The versions that break, named to the real modules before fcn_fast reads them.
    code = ("import numpy, triton; numpy.__version__ = '2.4.0'; triton.__version__ = '3.6.0'\n"
            "import fcn_fast; print(fcn_fast.available_backends()['triton'].reason)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == check("3.6.0", "2.4.0")


def test_the_torch_floor_is_the_same_in_pyproject_the_import_check_and_the_docs():
    floor = ".".join(map(str, fcn_fast._requirements.TORCH_FLOOR))
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.findall(r'"torch>=([0-9.]+)"', pyproject) == [floor, floor]  # build requirement and dependency
    assert f"torch ≥ {floor}" in (REPO / "README.md").read_text()
    assert f"torch ≥ {floor}" in (REPO / "docs" / "training.md").read_text()
