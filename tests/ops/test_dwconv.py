"""Fused depthwise conv + SiLU (SS2D's input glue) vs the reference: output and every gradient.

CPU: the Triton kernels run under TRITON_INTERPRET=1 on tiny shapes (x mostly a strided chunk of
a (Bt, H, W, 2 Dm) tensor, rows longer than their Dm channels; test_contiguous_x: SS2D's own
layout). GPU (-m gpu): the model's shapes in every dtype. Tolerance: STYLE.md's rule
(vmambax_kernels.testing), gradients rounded to the output dtype for every implementation alike.
"""

import pytest
import torch

import vmambax_kernels as vk
from vmambax_kernels.dwconv import triton as dw_triton
from vmambax_kernels.testing import DTYPES, TEST_DEVICE as DEVICE, assert_close_by_rule, cast, run_with_grads

pytestmark = pytest.mark.timeout(120)
# Small tiles so the tiny shapes span several tiles (several partial-sum rows in the backward) and
# cross plane boundaries.
SMALL = {"fwd": dict(BP=16, BC=8), "bwd_dz": dict(BP=16, BC=8), "bwd_dx": dict(BP=16, BC=8)}


# What the config fixture (conftest.py) sets for one test: tile sizes, channel blocks
CONFIG_OVERRIDE = dw_triton.CONFIG_OVERRIDE


def inputs(Bt, H, W, Dm, dtype, K=3, bias=True, device=DEVICE, seed=0):
    """xf (Bt, H, W, 2 Dm) rounded to dtype (the op sees its first half, a strided chunk), fp32
    weight at nn.Conv2d's init scale (fan-in K^2) and bias."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / K
    return dict(xf=torch.randn(Bt, H, W, 2 * Dm, generator=g).to(dtype).to(device),
                weight=((torch.rand(Dm, 1, K, K, generator=g) * 2 - 1) * bound).to(device),
                bias=((torch.rand(Dm, generator=g) * 2 - 1) * bound).to(device) if bias else None)


def op(backend):
    def fn(xf, weight, bias):
        return vk.dwconv_silu(xf[..., :weight.shape[0]], weight, bias, backend=backend)   # in_proj's chunk
    return fn


def check(inp, dtype, backend="triton", device_ref="cpu"):
    """STYLE.md's rule for the output and the gradients of xf, weight, bias."""
    Bt, H, W, _ = inp["xf"].shape
    Dm = inp["weight"].shape[0]
    grad = torch.randn(Bt, Dm, H, W, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, grads = run_with_grads(op(backend), inp, grad.to(inp["xf"].device))
    assert out.dtype == dtype and out.is_contiguous()
    r64, g64 = run_with_grads(op("reference"), cast(inp, torch.float64, device_ref), grad.double())
    r32, g32 = run_with_grads(op("reference"), cast(inp, torch.float32, device_ref), grad.float())
    assert_close_by_rule("out", out, r64, r32, dtype)
    for k in g64:
        assert_close_by_rule(f"grad {k}", grads[k], g64[k], g32[k], inp[k].dtype)


# ---------------------------------------------------------------------------------------------
# CPU (interpreter), tiny shapes
# ---------------------------------------------------------------------------------------------
# (Bt, H, W, Dm): H != W with Dm not a power of two, 4 x 4 windows (several planes per tile),
# a row (H = 1), a column (W = 1), 1 x 1 planes.
TINY = {"rect": (2, 5, 7, 12), "windows": (9, 4, 4, 40), "row": (2, 1, 9, 5), "col": (2, 6, 1, 5),
        "dot": (3, 1, 1, 6)}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(TINY), ids=list(TINY))
def test_matches_reference_tiny(shape, dtype):
    check(inputs(*TINY[shape], DTYPES[dtype], device="cpu"), DTYPES[dtype])


# The two backward kernels on different tiles: dz with 2-channel blocks and 32-position tiles, dx
# with a channel block wider than Dm and 8-position tiles (so the stencil's taps reach across
# several dx tiles).
MIXED = {"fwd": dict(BP=32, BC=4), "bwd_dz": dict(BP=32, BC=2), "bwd_dx": dict(BP=8, BC=16)}


@pytest.mark.parametrize("config", [SMALL, MIXED], indirect=True, ids=["small", "mixed"])
@pytest.mark.parametrize("case", [(1, 4, 37, 12), (11, 4, 4, 12), (3, 3, 5, 9), (2, 4, 8, 12)],
                         ids=["wide", "windows", "odd", "even"])
def test_several_tiles(config, case):
    """Tiles across plane boundaries, tiles that divide the plane (EVEN: 32 positions), channel
    blocks with a partial last one, dz and dx on different tilings, all by the rule."""
    check(inputs(*case, torch.float32, device="cpu", seed=3), torch.float32)


def test_gradient_layouts_agree():
    """The dz kernel reads g through its batch and channel strides: a channels-last g, copied to a
    packed plane, gives bit-identical gradients."""
    inp = inputs(2, 5, 6, 7, torch.float32, device="cpu", seed=12)
    x = inp["xf"][..., :7]
    g = torch.randn(2, 7, 5, 6, generator=torch.Generator().manual_seed(2))
    a = dw_triton._backward(g, x, inp["weight"], inp["bias"])
    b = dw_triton._backward(g.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), x, inp["weight"], inp["bias"])
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("K, bias", [(1, True), (5, False), (7, True)], ids=["k1", "k5-nobias", "k7"])
def test_kernel_sizes(K, bias):
    check(inputs(2, 5, 6, 7, torch.float32, K=K, bias=bias, device="cpu", seed=5), torch.float32)


def test_no_bias_bf16():
    check(inputs(2, 4, 5, 10, torch.bfloat16, bias=False, device="cpu", seed=6), torch.bfloat16)


def test_registered_ops_path(monkeypatch):
    """Under torch.compile the entry goes through the registered ops (eager uses an autograd
    Function over the same launchers): that route by the rule too, output and every gradient."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    check(inputs(2, 5, 7, 12, torch.float32, device="cpu", seed=7), torch.float32)
    check(inputs(2, 3, 4, 6, torch.float16, bias=False, device="cpu", seed=8), torch.float16)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_contiguous_x(dtype):
    """x as SS2D passes it since in_proj runs as two GEMMs: contiguous (Bt, H, W, Dm)."""
    inp = inputs(2, 5, 7, 12, DTYPES[dtype], device="cpu", seed=10)
    inp["xf"] = inp["xf"][..., :12].contiguous()
    check(inp, DTYPES[dtype])


def test_channel_stride_not_one_is_copied():
    """A channels-first tensor permuted to (Bt, H, W, Dm) (channel stride H W) gives the same result."""
    inp = inputs(2, 4, 5, 6, torch.float32, device="cpu", seed=9)
    x = inp["xf"][..., :6].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    assert x.stride(-1) != 1
    a = vk.dwconv_silu(x, inp["weight"], inp["bias"], backend="triton")
    b = vk.dwconv_silu(x.contiguous(), inp["weight"], inp["bias"], backend="triton")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float64_runs_the_reference():
    inp = inputs(1, 3, 4, 5, torch.float64, device="cpu")
    a = vk.dwconv_silu(inp["xf"][..., :5], inp["weight"], inp["bias"], backend="triton")
    b = vk.dwconv_silu(inp["xf"][..., :5], inp["weight"], inp["bias"], backend="reference")
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_available_backends():
    status = vk.available_backends("dwconv_silu")
    assert status["reference"].available and status["triton"].available
    assert not status["cuda"].available


BAD = {
    "x rank": (dict(x=torch.randn(4, 5, 6)), ValueError, r"x: expected a 4-D tensor, got 3-D"),
    "x int": (dict(x=torch.ones(2, 4, 5, 6, dtype=torch.int64)), TypeError, r"x: expected a floating-point"),
    "x empty": (dict(x=torch.randn(2, 0, 5, 6)), ValueError, r"x: expected every dimension >= 1"),
    "even kernel": (dict(weight=torch.randn(6, 1, 4, 4)), ValueError, r"weight: expected an odd kernel size 1\.\.7"),
    "kernel 9": (dict(weight=torch.randn(6, 1, 9, 9)), ValueError, r"weight: expected an odd kernel size"),
    "weight channels": (dict(weight=torch.randn(5, 1, 3, 3)), ValueError, r"weight: expected shape \(6, 1, 3, 3\)"),
    "not depthwise": (dict(weight=torch.randn(6, 2, 3, 3)), ValueError, r"weight: expected shape \(6, 1, 3, 3\)"),
    "non-square": (dict(weight=torch.randn(6, 1, 3, 5)), ValueError, r"weight: expected shape \(6, 1, 5, 5\)"),
    "bias shape": (dict(bias=torch.randn(5)), ValueError, r"bias: expected shape \(6,\)"),
    "bias rank": (dict(bias=torch.randn(6, 1)), ValueError, r"bias: expected a 1-D tensor"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises_with_message(case):
    changes, exc, msg = BAD[case]
    args = dict(x=torch.randn(2, 4, 5, 6), weight=torch.randn(6, 1, 3, 3), bias=torch.randn(6))
    args.update(changes)
    with pytest.raises(exc, match=msg):
        vk.dwconv_silu(**args, backend="triton")


def _opcheck(device, dtype, shape, bias=True):
    inp = inputs(*shape, dtype, bias=bias, device=device, seed=11)
    x = inp["xf"][..., :shape[-1]]
    args = (x.detach().requires_grad_(), inp["weight"].requires_grad_(),
            inp["bias"].requires_grad_() if bias else None)
    torch.library.opcheck(torch.ops.vmambax.dwconv_silu_triton_fwd.default, args)
    g = torch.randn(shape[0], shape[3], shape[1], shape[2], device=device).to(dtype)
    bwd_args = (g, x.detach(), inp["weight"].detach(), inp["bias"].detach() if bias else None)
    torch.library.opcheck(torch.ops.vmambax.dwconv_silu_triton_bwd.default, bwd_args)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_cpu(bias):
    _opcheck("cpu", torch.float32, (2, 3, 4, 5), bias)


# ---------------------------------------------------------------------------------------------
# GPU: the model's shapes, every dtype
# ---------------------------------------------------------------------------------------------
# enc1: the largest plane; enc4: the widest channels; inner: DCIM's 4 x 4 windows, many planes.
GPU_SHAPES = {"enc1": (8, 128, 128, 192), "enc4": (8, 16, 16, 1536), "inner": (8192, 4, 4, 96),
              "odd": (3, 37, 53, 40)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_gpu_model_shapes(shape, dtype, exact_cuda_refs):
    check(inputs(*GPU_SHAPES[shape], DTYPES[dtype], seed=1), DTYPES[dtype], device_ref="cuda")


@pytest.mark.gpu
def test_gpu_outputs_fully_written():
    """Poisoned caching-allocator memory must not leak through: NaN-filled blocks are reused."""
    inp = inputs(4, 33, 17, 40, torch.float16, seed=4)
    torch.full((4 * 33 * 17 * 40 * 8,), float("nan"), device="cuda", dtype=torch.float16)  # freed
    x = inp["xf"][..., :40].detach().requires_grad_()
    y = vk.dwconv_silu(x, inp["weight"], inp["bias"], backend="triton")
    assert torch.isfinite(y).all()
    y.backward(torch.ones_like(y))
    assert torch.isfinite(x.grad).all()


@pytest.mark.gpu
def test_gpu_opcheck():
    _opcheck("cuda", torch.bfloat16, (2, 9, 13, 24))
