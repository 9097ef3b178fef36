"""Triton norm-gate vs the reference (SS2D's LayerNorm + SiLU gate): output and every gradient.

CPU: the kernels run under TRITON_INTERPRET=1 on tiny shapes, with the default launch
configuration (one chunk holds the channel row) and with small chunks and tiles (several chunks, a
partial last chunk, tiles across planes and within one). GPU (-m gpu): the model's shapes in every
dtype. Tolerance: STYLE.md's rule (vmambax_kernels.testing).
"""

import pytest
import torch
from torch.func import functional_call

import vmambax_kernels as vk
from vmambax_kernels.modules import ss2d as ss2d_module
from vmambax_kernels.modules import glue
from vmambax_kernels.norm_gate import triton as ng_triton
from vmambax_kernels.testing import (DTYPES, ON_GPU, TEST_DEVICE as DEVICE, RoundGrad,
                                     assert_close_by_rule, cast, check_against_reference, run_with_grads)

pytestmark = pytest.mark.timeout(120)
EPS = 1e-5


# What the config fixture (conftest.py) sets for one test: chunk and tile sizes
CONFIG_OVERRIDE = ng_triton.CONFIG_OVERRIDE


def ng_inputs(Bt, Dm, H, W, dtype, device=DEVICE, seed=0):
    """y as the scan returns it (fp32, channels first, off-centre so the mean matters), z ~ N(0, 1)
    rounded to dtype, LayerNorm parameters near their init."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(Bt, Dm, H, W, generator=g) * 2 + 0.5).to(device)
    z = torch.randn(Bt, H, W, Dm, generator=g).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(Dm, generator=g)).to(device)
    bias = (0.1 * torch.randn(Dm, generator=g)).to(device)
    return dict(y=y, z=z, weight=weight, bias=bias)


def gate(backend, dtype, eps=EPS):
    def fn(y, z, weight, bias):
        return RoundGrad.apply(vk.norm_gate(y, z, weight, bias, eps, backend=backend), dtype)
    return fn


def check(inputs, dtype, device_ref="cpu", eps=EPS):
    check_against_reference(gate("triton", dtype, eps), gate("reference", dtype, eps), inputs,
                            out_dtype=dtype, device_ref=device_ref)


# ---------------------------------------------------------------------------------------------
# CPU (interpreter), tiny shapes
# ---------------------------------------------------------------------------------------------
# H != W, H = 1, W = 1, a single position per plane, several planes per tile; Dm 40 and 20 are
# not multiples of the 16-channel chunk below.
TINY = {"rect": (2, 40, 3, 5), "row": (1, 24, 1, 9), "col": (2, 20, 5, 1), "dot": (5, 12, 1, 1),
        "planes": (3, 40, 4, 4)}
# Chunks of 16 channels and tiles of 4..8 positions: several chunks with a partial last one, tiles
# within one plane (L a multiple of the tile) and across planes, several tiles per program.
CHUNKS = {k: dict(BD=16, max_one=8, tile=64, min_bp=4, max_bp=8) for k in ("fwd", "bwd")}


@pytest.mark.parametrize("config", [{}, CHUNKS], indirect=True, ids=["one", "chunks"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(TINY), ids=list(TINY))
def test_matches_reference_tiny(shape, dtype, config):
    check(ng_inputs(*TINY[shape], DTYPES[dtype], device="cpu", seed=1), DTYPES[dtype])


@pytest.mark.parametrize("config", [{}, CHUNKS], indirect=True, ids=["one", "chunks"])
def test_strided_z_and_gradient(config):
    """z as SS2D passes it (the second half of in_proj's output: row stride 2 Dm) and a
    non-contiguous output gradient (a transposed tensor)."""
    Bt, Dm, H, W = 2, 40, 3, 5
    inputs = ng_inputs(Bt, Dm, H, W, torch.bfloat16, device="cpu", seed=2)
    inputs["z"] = torch.cat([torch.randn_like(inputs["z"]), inputs["z"]], dim=-1)   # (Bt, H, W, 2 Dm)
    grad = torch.randn(Bt, W, H, Dm).to(torch.bfloat16).transpose(1, 2)

    def fn(backend):
        def run(y, z, weight, bias):
            assert backend == "reference" or z[..., Dm:].stride()[-2] == 2 * Dm
            return vk.norm_gate(y, z[..., Dm:], weight, bias, EPS, backend=backend)
        return run
    out, grads = run_with_grads(fn("triton"), inputs, grad)
    r64, g64 = run_with_grads(fn("reference"), cast(inputs, torch.float64), grad.double())
    r32, g32 = run_with_grads(fn("reference"), cast(inputs, torch.float32), grad.float())
    assert_close_by_rule("out", out, r64, r32, torch.bfloat16)
    for k in g64:
        assert_close_by_rule(f"grad {k}", grads[k], g64[k], g32[k], inputs[k].dtype)


def test_y_in_16_bits_and_eps():
    """y need not be float32 (dy comes back in y's dtype); a large eps is respected."""
    inputs = ng_inputs(2, 24, 3, 4, torch.float16, device="cpu", seed=3)
    inputs["y"] = inputs["y"].to(torch.bfloat16)
    check(inputs, torch.float16, eps=0.5)


def test_registered_ops_path(monkeypatch):
    """Under torch.compile the entry goes through the registered ops (eager uses an autograd
    Function over the same launchers): that route by the rule too, output and every gradient."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    check(ng_inputs(2, 40, 3, 5, torch.float32, device="cpu", seed=4), torch.float32)


def test_compile_fullgraph_traces_the_ops():
    inputs = ng_inputs(2, 12, 2, 3, torch.float32, device="cpu", seed=5)
    torch._dynamo.reset()
    fn = torch.compile(gate("triton", torch.float32), fullgraph=True, backend="aot_eager")
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out = fn(**leaves)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), gate("reference", torch.float32)(**inputs), rtol=1e-5, atol=1e-6)
    assert all(v.grad is not None for v in leaves.values())


def _opcheck(device, dtype, shape):
    inputs = ng_inputs(*shape, dtype, device=device, seed=6)
    args = tuple(v.requires_grad_() for v in inputs.values()) + (EPS,)
    torch.library.opcheck(torch.ops.vmambax.norm_gate_triton_fwd.default, args)
    with torch.no_grad():
        out, mean, rstd = torch.ops.vmambax.norm_gate_triton_fwd(*args)
    bwd_args = (torch.randn_like(out),) + tuple(v.detach() for v in args[:4]) + (mean, rstd)
    torch.library.opcheck(torch.ops.vmambax.norm_gate_triton_bwd.default, bwd_args)


def test_opcheck_cpu():
    _opcheck("cpu", torch.float32, (2, 12, 3, 2))


def test_float64_runs_the_reference():
    inputs = cast(ng_inputs(1, 6, 2, 3, torch.float32, device="cpu"), torch.float64)
    out = vk.norm_gate(**inputs, backend="triton")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, vk.norm_gate(**inputs, backend="reference"), rtol=0, atol=0)


def test_availability_and_refusal(monkeypatch):
    assert ng_triton.availability() is None  # interpreter on CPU, or a GPU
    if ON_GPU:
        return
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in ng_triton.availability()
    with pytest.raises(RuntimeError, match="triton"):
        vk.norm_gate(**ng_inputs(1, 3, 4, 5, torch.float32, device="cpu"), backend="triton")


BAD = {
    "z shape": (dict(z=torch.randn(2, 3, 5, 7)), ValueError, r"z: expected shape \(2, 3, 5, 8\)"),
    "z channels first": (dict(z=torch.randn(2, 8, 3, 5)), ValueError, r"z: expected shape \(2, 3, 5, 8\)"),
    "y rank": (dict(y=torch.randn(8, 3, 5)), ValueError, r"y: expected a 4-D tensor, got 3-D"),
    "y int": (dict(y=torch.ones(2, 8, 3, 5, dtype=torch.int64)), TypeError, r"y: expected a floating-point"),
    "weight shape": (dict(weight=torch.ones(7)), ValueError, r"weight: expected shape \(8,\)"),
    "bias None": (dict(bias=None), TypeError, r"bias: expected a torch.Tensor, got NoneType"),
    "eps": (dict(eps=-1.0), ValueError, r"eps: expected a finite number >= 0, got -1.0"),
    "empty": (dict(y=torch.randn(2, 8, 0, 5), z=torch.randn(2, 0, 5, 8)), ValueError, r"y: expected every dimension >= 1"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises_with_message(case):
    changes, exc, msg = BAD[case]
    inputs = dict(ng_inputs(2, 8, 3, 5, torch.float32, device="cpu"), eps=EPS)
    inputs.update(changes)
    with pytest.raises(exc, match=msg):
        vk.norm_gate(**inputs, backend="triton")


# ---------------------------------------------------------------------------------------------
# SS2D's switch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", sorted(glue.SWITCHES))
def test_ss2d_switch(monkeypatch, op):
    assert not glue.fused_in_ss2d(op, None, "cpu")
    assert not glue.fused_in_ss2d(op, "reference", "cuda")
    assert not glue.fused_in_ss2d(op, None, "cuda", False)
    monkeypatch.setenv(glue.SWITCHES[op], "0")
    assert not glue.fused_in_ss2d(op, None, "cuda")
    if ng_triton.availability() is None:   # triton is the scan's automatic choice on CUDA tensors
        assert glue.fused_in_ss2d(op, "triton", "cuda", True)
        monkeypatch.setenv(glue.SWITCHES[op], "1")
        assert glue.fused_in_ss2d(op, "triton", "cuda")


def test_ss2d_fused_path_matches_plain(monkeypatch):
    """SS2D with the fused glue (dwconv_silu and norm_gate) against SS2D's PyTorch ops (and the reference scan): output and the
    gradient of x and every parameter, by the rule. On CPU the fused path is forced on."""
    torch.manual_seed(0)
    fused, plain = vk.SS2D(6, d_state=4).to(DEVICE), vk.SS2D(6, d_state=4).to(DEVICE)
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain.load_state_dict(fused.state_dict())
    plain.fused_dwconv, plain.fused_norm_gate, plain.backend = False, False, "reference"
    if not ON_GPU:
        monkeypatch.setattr(ss2d_module, "fused_in_ss2d", lambda op, backend, device, enabled=None: enabled is not False)
    calls = []
    monkeypatch.setattr(ss2d_module, "norm_gate", lambda *a, **k: calls.append("ng") or vk.norm_gate(*a, **k))
    monkeypatch.setattr(ss2d_module, "dwconv_silu", lambda *a, **k: calls.append("dw") or vk.dwconv_silu(*a, **k))
    params = {k: v.detach() for k, v in fused.named_parameters()}
    x = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(7)).to(DEVICE)

    def run(module):
        return lambda x, **p: functional_call(module, p, (x,))
    check_against_reference(run(fused), run(plain), {"x": x, **params}, device_ref=DEVICE)
    assert calls == ["dw", "ng"]   # the fused run only


# ---------------------------------------------------------------------------------------------
# GPU: the model's shapes (the encoder runs on [ct; pet], so Bt = 2 x batch 8)
# ---------------------------------------------------------------------------------------------
GPU_SHAPES = {"enc1": (16, 192, 128, 128), "enc4": (16, 1536, 16, 16),
              "dcim_inner1": (8192, 96, 4, 4), "outer_dot": (64, 768, 1, 1), "odd": (3, 40, 37, 53)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_gpu_model_shapes(shape, dtype):
    check(ng_inputs(*GPU_SHAPES[shape], DTYPES[dtype], seed=1), DTYPES[dtype], device_ref="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("config", [CHUNKS], indirect=True, ids=["chunks"])
def test_gpu_small_chunks(config):
    check(ng_inputs(3, 40, 9, 7, torch.bfloat16, seed=2), torch.bfloat16, device_ref="cuda")


@pytest.mark.gpu
def test_gpu_outputs_fully_written():
    """Poisoned caching-allocator memory must not leak through: NaN-filled blocks are reused."""
    inputs = ng_inputs(2, 200, 13, 11, torch.bfloat16, seed=3)
    torch.full((2 * 200 * 13 * 11 * 8,), float("nan"), device="cuda")  # freed, then reused
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    out = vk.norm_gate(**leaves, backend="triton")
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and all(torch.isfinite(v.grad).all() for v in leaves.values())


@pytest.mark.gpu
def test_gpu_opcheck():
    _opcheck("cuda", torch.bfloat16, (2, 200, 9, 13))
