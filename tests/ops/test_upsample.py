"""up2_bilinear (the decoder's bilinear x2 with a gathering backward) vs the reference (PyTorch's
bilinear interpolation): output and gradient; the registered op; bad input.

CPU: the kernel runs under TRITON_INTERPRET=1 on tiny shapes (H != W, H = 1, W = 1, one pixel,
channels over one block and not a multiple of it, several tiles per plane and tiles across planes).
GPU (-m gpu): the model's shapes. Tolerance: STYLE.md's rule (vmambax_kernels.testing), the output
gradient rounded to the output dtype for every implementation alike.
"""

import pytest
import torch

import vmambax_kernels as vk
from vmambax_kernels.testing import DTYPES, ON_GPU, assert_close_by_rule, cast, run_with_grads
from vmambax_kernels.upsample import triton as up_triton

pytestmark = pytest.mark.timeout(120)


def op(backend):
    def fn(x):
        return vk.up2_bilinear(x, backend=backend)
    return fn


def check(shape, dtype, device="cpu", seed=0, backend="triton"):
    """The rule for the output and the gradient of x; x rounded to dtype, fp32 / fp64 references on
    the same values and the same (rounded) output gradient."""
    Bt, H, W, C = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype).to(device)
    grad = torch.randn(Bt, 2 * H, 2 * W, C, generator=gen).to(dtype)
    out, grads = run_with_grads(op(backend), {"x": x}, grad.to(device))
    assert out.dtype == dtype and out.is_contiguous() and out.shape == (Bt, 2 * H, 2 * W, C)
    assert grads["x"].dtype == dtype
    r64, g64 = run_with_grads(op("reference"), cast({"x": x}, torch.float64, "cpu"), grad.double())
    r32, g32 = run_with_grads(op("reference"), cast({"x": x}, torch.float32, "cpu"), grad.float())
    assert_close_by_rule("out", out, r64, r32, dtype)
    assert_close_by_rule("grad x", grads["x"], g64["x"], g32["x"], dtype)


# ---------------------------------------------------------------------------------------------
# CPU (interpreter), tiny shapes
# ---------------------------------------------------------------------------------------------

TINY = {"rect": (2, 3, 5, 7), "row": (2, 1, 6, 5), "col": (1, 4, 1, 3), "dot": (3, 1, 1, 2),
        "wide_c": (1, 2, 3, 70)}  # 70 channels: two blocks of 64, the second partial


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(TINY), ids=list(TINY))
def test_matches_reference_tiny(shape, dtype):
    check(TINY[shape], DTYPES[dtype])


def test_tiles_across_planes(monkeypatch):
    """Tiles of 8 positions over planes of 15: a tile holds the end of one plane and the start of
    the next, and a plane spans several tiles."""
    monkeypatch.setattr(up_triton, "BP", 8)
    check((3, 3, 5, 4), torch.float32, seed=2)


def test_gradient_strides():
    """A channels-last output gradient with a channel stride other than one is copied: the same
    gradient as the contiguous one, bit for bit."""
    g = torch.randn(2, 6, 8, 5, generator=torch.Generator().manual_seed(4))
    strided = g.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    assert strided.stride(-1) != 1
    torch.testing.assert_close(up_triton._backward(strided, 3, 4), up_triton._backward(g, 3, 4), rtol=0, atol=0)


def test_input_strides():
    """x need not be contiguous (a channels-first map permuted to channels last): same results."""
    x = torch.randn(2, 6, 3, 5, generator=torch.Generator().manual_seed(5)).permute(0, 2, 3, 1)
    a = vk.up2_bilinear(x, backend="triton")
    b = vk.up2_bilinear(x.contiguous(), backend="triton")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_registered_op_path(monkeypatch):
    """Under torch.compile the backward goes through the registered op (eager calls the launch):
    that route by the rule too."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    check((2, 3, 5, 7), torch.float32, seed=6)


def test_compiled_matches_eager():
    """torch.compile (aot_eager: Dynamo and AOTAutograd, no Inductor) traces the autograd Function,
    its backward through the registered op: the same gradient as eager, bit for bit. (The forward
    is PyTorch's interpolation, which AOTAutograd decomposes: it rounds differently, by the rule.)"""
    x = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(8))
    g = torch.randn(2, 6, 10, 4, generator=torch.Generator().manual_seed(9))
    runs = []
    for fn in (op("triton"), torch.compile(op("triton"), backend="aot_eager", fullgraph=True)):
        out, grads = run_with_grads(fn, {"x": x}, g)
        runs.append((out, grads["x"]))
    (out, dx), (out_c, dx_c) = runs
    torch.testing.assert_close(dx_c, dx, rtol=0, atol=0)
    r64 = vk.up2_bilinear(x.double(), backend="reference")
    assert_close_by_rule("compiled out", out_c, r64, out, torch.float32)


def test_opcheck():
    g = torch.randn(2, 6, 4, 5, generator=torch.Generator().manual_seed(7))
    torch.library.opcheck(torch.ops.vmambax.up2_bilinear_bwd_triton.default, (g, 3, 2))


def test_float64_runs_the_reference():
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    a = vk.up2_bilinear(x, backend="triton")
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, vk.up2_bilinear(x, backend="reference"), rtol=0, atol=0)


@pytest.mark.parametrize("bad, error, text", [
    (torch.zeros(2, 3, 4), ValueError, "x"),
    (torch.zeros(1, 2, 2, 3, dtype=torch.int32), TypeError, "x"),
    (torch.zeros(1, 0, 2, 3), ValueError, "x"),
])
def test_bad_input_names_the_argument(bad, error, text):
    with pytest.raises(error, match=text):
        vk.up2_bilinear(bad, backend="triton")


# ---------------------------------------------------------------------------------------------
# GPU: the model's shapes (PatchExpand at 32, 64, 128 squared; the final x4's two steps)
# ---------------------------------------------------------------------------------------------

MODEL = {"expand1": (8, 16, 16, 384), "expand2": (8, 32, 32, 192), "expand3": (8, 64, 64, 96),
         "final_a": (8, 128, 128, 96), "final_b": (8, 256, 256, 96), "odd": (3, 37, 53, 20)}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(MODEL), ids=list(MODEL))
def test_gpu_model_shapes(shape, dtype):
    check(MODEL[shape], DTYPES[dtype], device="cuda")
