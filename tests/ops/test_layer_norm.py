"""Triton layer_norm vs the reference (LayerNorm in fp32, rounded once to out_dtype): output and
every gradient; the registered ops; bad input; the drop-in module LayerNorm.

CPU: the kernels run under TRITON_INTERPRET=1 on tiny shapes (odd and non-power-of-two C, C = 1,
1-D to 4-D x), with the default launch configuration (one chunk holds the row) and with small
chunks and tiles (several chunks, a partial last one, several tiles per program), and in every
layout the kernels take in place (rows at a stride, a channels-first map permuted to channels
last) or copy. GPU (-m gpu): the model's shapes. Tolerance: STYLE.md's rule (vmambax_kernels.testing).
"""

import contextlib

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

import vmambax_kernels as vk
from vmambax_kernels.layer_norm import triton as ln_triton
from vmambax_kernels.modules import LayerNorm, glue
from vmambax_kernels.modules import layer_norm as ln_module
from vmambax_kernels.norm_gate import triton as ng_triton
from vmambax_kernels.testing import (DTYPES, ON_GPU, TEST_DEVICE as DEVICE, RoundGrad,
                                     assert_close_by_rule, cast, check_against_reference, run_with_grads)

pytestmark = pytest.mark.timeout(120)
EPS = 1e-5


# What the config fixture (conftest.py) sets for one test: chunk and tile sizes (norm_gate's
# override: the two ops share their launch configuration)
CONFIG_OVERRIDE = ng_triton.CONFIG_OVERRIDE


def ln_inputs(shape, dtype, device=DEVICE, seed=0, affine=True):
    """x off-centre (so the mean matters) rounded to dtype, LayerNorm parameters near their init."""
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(C, generator=g)).to(device) if affine else None
    bias = (0.1 * torch.randn(C, generator=g)).to(device) if affine else None
    return dict(x=x, weight=weight, bias=bias)


def ln(backend, out_dtype, eps=EPS):
    """The op as a function of (x, weight, bias). The references keep their compute dtype (float64 /
    float32: the rule adds out_dtype's rounding) and see the output gradient rounded as the op does."""
    def fn(x, weight, bias):
        od = out_dtype if backend == "triton" else x.dtype
        return RoundGrad.apply(vk.layer_norm(x, weight, bias, eps, od, backend=backend), out_dtype)
    return fn


def check(inputs, out_dtype, device_ref="cpu", eps=EPS):
    check_against_reference(ln("triton", out_dtype, eps), ln("reference", out_dtype, eps), inputs,
                            out_dtype=out_dtype, device_ref=device_ref)


# ---------------------------------------------------------------------------------------------
# CPU (interpreter), tiny shapes
# ---------------------------------------------------------------------------------------------
# C 37 odd, 40 and 20 not multiples of the 16-channel chunk below, C = 1 (xhat = 0), 1-D to 4-D x
TINY = {"rows": (7, 37), "map": (2, 3, 5, 40), "vector": (20,), "c1": (3, 4, 1), "planes": (5, 4, 4, 24)}
# (x dtype, out_dtype): fp32 activations into a bf16/fp16 consumer (the model under autocast), and more
PAIRS = {"fp32-bf16": ("fp32", "bf16"), "fp32-fp16": ("fp32", "fp16"), "fp32-fp32": ("fp32", "fp32"),
         "bf16-bf16": ("bf16", "bf16"), "fp16-fp16": ("fp16", "fp16"), "bf16-fp32": ("bf16", "fp32")}
# Chunks of 16 channels and tiles of 4..8 positions: several chunks with a partial last one,
# several tiles per program, planes the tiles divide (EVEN) and not
CHUNKS = {k: dict(BD=16, max_one=8, tile=64, min_bp=4, max_bp=8) for k in ("fwd", "bwd")}


@pytest.mark.parametrize("config", [{}, CHUNKS], indirect=True, ids=["one", "chunks"])
@pytest.mark.parametrize("pair", list(PAIRS), ids=list(PAIRS))
@pytest.mark.parametrize("shape", list(TINY), ids=list(TINY))
def test_matches_reference_tiny(shape, pair, config):
    x_dtype, out_dtype = (DTYPES[d] for d in PAIRS[pair])
    check(ln_inputs(TINY[shape], x_dtype, device="cpu", seed=1), out_dtype)


def _strided_check(make_x, grad_layout, out_dtype=torch.bfloat16):
    """x = make_x(contiguous values) and the output gradient through grad_layout, both by the rule."""
    inputs = ln_inputs((2, 3, 5, 40), torch.float32, device="cpu", seed=2)
    grad = grad_layout(torch.randn(2, 3, 5, 40).to(out_dtype))

    def fn(backend):
        base = ln(backend, out_dtype)
        return lambda x, weight, bias: base(make_x(x), weight, bias)
    out, grads = run_with_grads(fn("triton"), inputs, grad)
    r64, g64 = run_with_grads(fn("reference"), cast(inputs, torch.float64), grad.double())
    r32, g32 = run_with_grads(fn("reference"), cast(inputs, torch.float32), grad.float())
    assert_close_by_rule("out", out, r64, r32, out_dtype)
    for k in g64:
        assert_close_by_rule(f"grad {k}", grads[k], g64[k], g32[k], inputs[k].dtype)


LAYOUTS = {
    # DCIM's coarse map: a channels-first conv output permuted to channels last (planes, in place)
    "permuted": lambda x: x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
    # a chunk of a wider tensor, as SS2D's halves of in_proj (rows at stride 2C, in place)
    "chunk": lambda x: torch.cat([x, x.flip(-1)], dim=-1)[..., :40],
    # H and W swapped in memory: neither view exists, the kernels get a copy
    "transposed": lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),
}
GRADS = {"contiguous": lambda g: g, "permuted": lambda g: g.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
         "transposed": lambda g: g.transpose(1, 2).contiguous().transpose(1, 2),
         "expanded": lambda g: g[:1, :1, :1].expand(g.shape)}


@pytest.mark.parametrize("grad", list(GRADS), ids=list(GRADS))
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_layouts(layout, grad):
    _strided_check(LAYOUTS[layout], GRADS[grad])


def test_planes_view_and_dx_layout():
    """Which layouts the kernels read in place, and dx coming back in x's layout."""
    x = torch.randn(2, 40, 3, 5).permute(0, 2, 3, 1)                      # (2, 3, 5, 40) channels first
    assert ln_triton._planes(x).data_ptr() == x.data_ptr() and ln_triton._planes(x).shape == (2, 15, 40)
    rows = torch.randn(6, 80)[:, :40]
    assert ln_triton._planes(rows).data_ptr() == rows.data_ptr() and ln_triton._planes(rows).shape == (6, 1, 40)
    swapped = torch.randn(2, 5, 3, 40).transpose(1, 2)
    assert ln_triton._planes(swapped).data_ptr() != swapped.data_ptr()      # copied
    x = x.detach().requires_grad_()
    out = vk.layer_norm(x, None, None, EPS, torch.bfloat16, backend="triton")
    out.backward(torch.randn_like(out))
    assert out.is_contiguous() and x.grad.stride() == x.stride()


def test_no_affine_and_eps():
    """weight and bias None (nn.LayerNorm(elementwise_affine=False)); a large eps is respected."""
    check(ln_inputs((3, 5, 24), torch.float32, device="cpu", seed=3, affine=False), torch.bfloat16, eps=0.5)
    inputs = ln_inputs((3, 5, 24), torch.float32, device="cpu", seed=3)
    inputs["bias"] = None
    check(inputs, torch.float16)


def test_empty_rows():
    x = torch.randn(0, 3, 8, requires_grad=True)
    w, b = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    out = vk.layer_norm(x, w, b, EPS, torch.bfloat16, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 3, 8) and x.grad.shape == x.shape and not w.grad.any() and not b.grad.any()


def test_parameter_gradients_are_deterministic():
    """dweight and dbias are per-program partial sums added by one torch.sum: two runs give the same
    bits (the GPU test below runs it where scheduling could differ)."""
    _same_bits_twice(ln_inputs((9, 7, 40), torch.float32, device="cpu", seed=4))


def _same_bits_twice(inputs):
    runs = [run_with_grads(ln("triton", torch.bfloat16), inputs)[1] for _ in range(2)]
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_registered_ops_path(monkeypatch):
    """Under torch.compile the entry goes through the registered ops (eager uses an autograd
    Function over the same launchers): that route by the rule too, output and every gradient."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    check(ln_inputs((2, 3, 5, 40), torch.float32, device="cpu", seed=5), torch.bfloat16)
    check(ln_inputs((2, 3, 5, 40), torch.float32, device="cpu", seed=5, affine=False), torch.float32)


def test_compile_fullgraph_traces_the_ops():
    inputs = ln_inputs((2, 3, 12), torch.float32, device="cpu", seed=6)
    torch._dynamo.reset()
    fn = torch.compile(ln("triton", torch.bfloat16), fullgraph=True, backend="aot_eager")
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out = fn(**leaves)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.detach(), ln("triton", torch.bfloat16)(**inputs), rtol=0, atol=0)
    assert all(v.grad is not None for v in leaves.values())


def _opcheck(device, dtype, shape, permute=False):
    inputs = ln_inputs(shape, dtype, device=device, seed=7)
    x = inputs["x"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1) if permute else inputs["x"]
    args = (x.requires_grad_(), inputs["weight"].requires_grad_(), inputs["bias"].requires_grad_(), EPS,
            torch.bfloat16)
    torch.library.opcheck(torch.ops.vmambax.layer_norm_triton_fwd.default, args)
    with torch.no_grad():
        out, mean, rstd = torch.ops.vmambax.layer_norm_triton_fwd(*args)
    bwd_args = (torch.randn_like(out), x.detach(), inputs["weight"].detach(), mean, rstd)
    torch.library.opcheck(torch.ops.vmambax.layer_norm_triton_bwd.default, bwd_args)


@pytest.mark.parametrize("permute", [False, True], ids=["contiguous", "permuted"])
def test_opcheck_cpu(permute):
    _opcheck("cpu", torch.float32, (2, 3, 2, 12), permute)


def test_autocast_does_not_recast_the_op(monkeypatch):
    """Custom ops and autograd Functions are in none of autocast's cast lists: under autocast the op
    takes x and the fp32 parameters as they are and returns out_dtype, eager and registered path
    alike (CPU autocast here; CUDA autocast's dispatch key falls through the same way)."""
    inputs = ln_inputs((2, 3, 24), torch.float32, device="cpu", seed=8)
    plain = vk.layer_norm(**inputs, eps=EPS, out_dtype=torch.float16, backend="triton")
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = vk.layer_norm(**inputs, eps=EPS, out_dtype=torch.float16, backend="triton")
        assert out.dtype == torch.float16 and torch.equal(out, plain)


def test_float64_runs_the_reference():
    inputs = cast(ln_inputs((2, 3, 6), torch.float32, device="cpu"), torch.float64)
    out = vk.layer_norm(**inputs, out_dtype=torch.float64, backend="triton")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, vk.layer_norm(**inputs, out_dtype=torch.float64, backend="reference"),
                               rtol=0, atol=0)


def test_available_backends_and_refusal(monkeypatch):
    status = vk.available_backends("layer_norm")
    assert status["reference"].available and not status["cuda"].available
    assert ln_triton.availability() is None  # interpreter on CPU, or a GPU
    if ON_GPU:
        return
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in ln_triton.availability()
    with pytest.raises(RuntimeError, match="triton"):
        vk.layer_norm(**ln_inputs((2, 5), torch.float32, device="cpu"), backend="triton")


BAD = {
    "x scalar": (dict(x=torch.tensor(1.0)), ValueError, r"x: expected at least one dimension"),
    "x int": (dict(x=torch.ones(2, 8, dtype=torch.int64)), TypeError, r"x: expected a floating-point"),
    "x list": (dict(x=[1.0] * 8), TypeError, r"x: expected a torch.Tensor, got list"),
    "x empty rows": (dict(x=torch.randn(2, 0)), ValueError, r"a last dimension >= 1, got shape \(2, 0\)"),
    "weight shape": (dict(weight=torch.ones(7)), ValueError, r"weight: expected shape \(8,\), got \(7,\)"),
    "bias rank": (dict(bias=torch.zeros(1, 8)), ValueError, r"bias: expected a 1-D tensor, got 2-D"),
    "weight int": (dict(weight=torch.ones(8, dtype=torch.int32)), TypeError, r"weight: expected a floating-point"),
    "eps": (dict(eps=-1.0), ValueError, r"eps: expected a finite number >= 0, got -1.0"),
    "eps nan": (dict(eps=float("nan")), ValueError, r"eps: expected a finite number >= 0, got nan"),
    "out_dtype": (dict(out_dtype=torch.int8), TypeError, r"out_dtype: expected one of float32/bfloat16/float16/float64, got torch.int8"),
    "device": (dict(weight=torch.ones(8, device="meta")), ValueError, r"weight: expected device cpu"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises_with_message(case):
    changes, exc, msg = BAD[case]
    inputs = dict(ln_inputs((3, 8), torch.float32, device="cpu"), eps=EPS, out_dtype=torch.bfloat16)
    inputs.update(changes)
    with pytest.raises(exc, match=msg):
        vk.layer_norm(**inputs, backend="triton")


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------

def _pair(C=24, seed=9, **kwargs):
    """A LayerNorm and an nn.LayerNorm with the same (perturbed) parameters."""
    torch.manual_seed(seed)
    ours, plain = LayerNorm(C, **kwargs), nn.LayerNorm(C, **kwargs)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def test_module_is_a_drop_in():
    ours, plain = _pair(eps=1e-6, bias=False)
    assert isinstance(ours, nn.LayerNorm) and ours.state_dict().keys() == plain.state_dict().keys()
    assert repr(ours).startswith("LayerNorm(") and ours.eps == 1e-6 and ours.bias is None
    ours, plain = _pair()
    assert list(ours.state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "cpu_autocast"])
def test_module_on_cpu_is_nn_layer_norm(autocast):
    """Off CUDA (and on CUDA without 16-bit autocast) the module is nn.LayerNorm's forward, bit for
    bit, gradients included."""
    ours, plain = _pair()
    x = torch.randn(2, 3, 5, 24, generator=torch.Generator().manual_seed(10))
    runs = []
    for m in (ours, plain):
        xl = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(xl)
        out.float().pow(2).sum().backward()
        runs.append((out, xl.grad, m.weight.grad, m.bias.grad))
    assert runs[0][0].dtype == runs[1][0].dtype
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert ours._fused_dtype(x) is None


def test_module_fused_path_is_the_op(monkeypatch):
    """The module's fused branch (forced on CPU: it needs CUDA autocast) is the op with the module's
    parameters, eps and the autocast dtype, by the rule against nn.LayerNorm's fp32 result (the
    reference with out_dtype fp32)."""
    ours, _ = _pair(C=40)
    monkeypatch.setattr(LayerNorm, "_fused_dtype", lambda self, x: torch.bfloat16)
    calls = []
    monkeypatch.setattr(ln_module, "layer_norm", lambda *a, **k: calls.append(a[3:] + (k,)) or vk.layer_norm(*a, **k))
    params = {k: v.detach() for k, v in ours.named_parameters()}
    x = torch.randn(2, 3, 5, 40, generator=torch.Generator().manual_seed(11)).to(DEVICE)

    def run(x, weight, bias):
        return torch.func.functional_call(ours, {"weight": weight, "bias": bias}, (x,))
    check_against_reference(run, ln("reference", torch.bfloat16), {"x": x, **params}, out_dtype=torch.bfloat16,
                            device_ref=DEVICE)
    assert calls == [(ours.eps, torch.bfloat16, {"backend": "triton"})]


@contextlib.contextmanager
def _cuda_autocast(dtype):
    """CUDA autocast's state without a GPU (torch.autocast("cuda") disables itself there)."""
    state = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", dtype is not None)
    torch.set_autocast_dtype("cuda", dtype or state[1])
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", state[0])
        torch.set_autocast_dtype("cuda", state[1])


def test_module_decision_on_fake_cuda_tensors(monkeypatch):
    """When the module takes the kernel: fake CUDA tensors (no GPU needed) under each autocast state."""
    monkeypatch.delenv("VMAMBAX_BACKEND", raising=False)
    monkeypatch.delenv("VMAMBAX_FUSED_LAYER_NORM", raising=False)
    ours, wide = LayerNorm(8), LayerNorm((4, 8))
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 3, 8, device="cuda")
        with _cuda_autocast(None):
            assert ours._fused_dtype(x) is None                     # no autocast: nn.LayerNorm's fp32
        for dtype in (torch.bfloat16, torch.float16):
            with _cuda_autocast(dtype), torch.no_grad():
                assert ours._fused_dtype(x) == dtype
                assert ours._fused_dtype(x.to(torch.bfloat16)) == dtype
                assert ours._fused_dtype(x.double()) is None        # autocast leaves float64 alone
                assert wide._fused_dtype(x.view(2, 3, 8)) is None   # 2-D normalized_shape
                ours.fused = False
                assert ours._fused_dtype(x) is None
                ours.fused = None
                monkeypatch.setenv("VMAMBAX_FUSED_LAYER_NORM", "0")
                assert ours._fused_dtype(x) is None
                monkeypatch.delenv("VMAMBAX_FUSED_LAYER_NORM")


def test_module_kernel_in_training_only_when_asked(monkeypatch):
    """With a gradient to compute the module runs nn.LayerNorm unless fused=True or
    $VMAMBAX_FUSED_LAYER_NORM=train; without one (no_grad, frozen parameters) it takes the kernel."""
    monkeypatch.delenv("VMAMBAX_BACKEND", raising=False)
    monkeypatch.delenv("VMAMBAX_FUSED_LAYER_NORM", raising=False)
    ours = LayerNorm(8)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 3, 8, device="cuda")
        with _cuda_autocast(torch.bfloat16):
            assert ours._fused_dtype(x) is None                     # parameters require grad
            with torch.no_grad():
                assert ours._fused_dtype(x) == torch.bfloat16
            ours.fused = True
            assert ours._fused_dtype(x) == torch.bfloat16
            ours.fused = None
            monkeypatch.setenv("VMAMBAX_FUSED_LAYER_NORM", "train")
            assert ours._fused_dtype(x) == torch.bfloat16
            monkeypatch.delenv("VMAMBAX_FUSED_LAYER_NORM")
            ours.requires_grad_(False)
            assert ours._fused_dtype(x) == torch.bfloat16           # frozen norm, x without grad
            assert ours._fused_dtype(x.requires_grad_(True)) is None


def test_switch(monkeypatch):
    monkeypatch.delenv("VMAMBAX_BACKEND", raising=False)
    assert not glue.fused_layer_norm("cpu")
    assert not glue.fused_layer_norm("cuda", False)
    monkeypatch.setenv("VMAMBAX_FUSED_LAYER_NORM", "0")
    assert not glue.fused_layer_norm("cuda")
    if ln_triton.availability() is None:   # Triton runs here (GPU or interpreter)
        assert glue.fused_layer_norm("cuda", True)
        monkeypatch.setenv("VMAMBAX_FUSED_LAYER_NORM", "1")
        assert glue.fused_layer_norm("cuda")
        monkeypatch.setenv("VMAMBAX_BACKEND", "reference")   # the reference stays the spec
        assert not glue.fused_layer_norm("cuda")


# ---------------------------------------------------------------------------------------------
# GPU: the model's shapes (the encoder runs on [ct; pet], so 2 x batch 8)
# ---------------------------------------------------------------------------------------------
GPU_SHAPES = {"enc1": (16, 128, 128, 96), "enc2": (16, 64, 64, 192), "enc3": (16, 32, 32, 384),
              "enc4": (16, 16, 16, 768), "merge1": (16, 64, 64, 384), "window1": (8192, 1536),
              "window4": (128, 12288), "odd": (3, 37, 53, 40)}
GPU_PAIRS = ("fp32-bf16", "fp32-fp16", "fp32-fp32", "bf16-bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("pair", GPU_PAIRS, ids=GPU_PAIRS)
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_gpu_model_shapes(shape, pair):
    x_dtype, out_dtype = (DTYPES[d] for d in PAIRS[pair])
    check(ln_inputs(GPU_SHAPES[shape], x_dtype, seed=1), out_dtype, device_ref="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("grad", ["contiguous", "permuted"])
def test_gpu_dcim_outer_permuted(grad):
    """DCIM's coarse map at stage 1 (8, 32, 32, 96) as its LayerNorm gets it: a bf16 channels-first
    conv output permuted to channels last."""
    inputs = ln_inputs((8, 32, 32, 96), torch.bfloat16, seed=2)
    inputs["x"] = inputs["x"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)   # channels-first memory
    g = torch.randn(8, 32, 32, 96, device="cuda").to(torch.bfloat16)
    g = GRADS[grad](g)
    out, grads = run_with_grads(ln("triton", torch.bfloat16), inputs, g)
    r64, g64 = run_with_grads(ln("reference", torch.bfloat16), cast(inputs, torch.float64), g.double())
    r32, g32 = run_with_grads(ln("reference", torch.bfloat16), cast(inputs, torch.float32), g.float())
    assert_close_by_rule("out", out, r64, r32, torch.bfloat16)
    for k in g64:
        assert_close_by_rule(f"grad {k}", grads[k], g64[k], g32[k], inputs[k].dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [CHUNKS], indirect=True, ids=["chunks"])
def test_gpu_small_chunks(config):
    check(ln_inputs((3, 9, 7, 40), torch.float32, seed=3), torch.bfloat16, device_ref="cuda")


@pytest.mark.gpu
def test_gpu_outputs_fully_written():
    """Poisoned caching-allocator memory must not leak through: NaN-filled blocks are reused."""
    inputs = ln_inputs((2, 13, 11, 200), torch.float32, seed=4)
    torch.full((2 * 200 * 13 * 11 * 8,), float("nan"), device="cuda")  # freed, then reused
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    out = vk.layer_norm(**leaves, eps=EPS, out_dtype=torch.bfloat16, backend="triton")
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and all(torch.isfinite(v.grad).all() for v in leaves.values())


@pytest.mark.gpu
def test_gpu_parameter_gradients_are_deterministic():
    _same_bits_twice(ln_inputs((16, 64, 64, 192), torch.float32, seed=5))


@pytest.mark.gpu
def test_gpu_opcheck():
    _opcheck("cuda", torch.float32, (2, 9, 13, 200))
    _opcheck("cuda", torch.bfloat16, (2, 9, 13, 200), permute=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gpu_module_under_autocast(dtype):
    """Under CUDA autocast without a gradient the module returns nn.LayerNorm's fp32 result in the
    autocast dtype: each element equals nn.LayerNorm's output cast to it, or is its neighbour where
    the two fp32 results (a few fp32 ulps apart: different summation orders) straddle a rounding
    boundary. With a gradient to compute (training) it is nn.LayerNorm itself."""
    ours, plain = (m.cuda() for m in _pair(C=96))
    x = torch.randn(8, 32, 32, 96, device="cuda") * 2 + 0.5
    with torch.autocast("cuda", dtype=DTYPES[dtype]):
        train_out = ours(x)
        with torch.no_grad():
            out, ref = ours(x), plain(x)
    assert torch.equal(train_out, ref)
    assert out.dtype == DTYPES[dtype] and ref.dtype == torch.float32
    # one ulp of the 16-bit value (at least fp16's subnormal spacing)
    ulp = (ref.to(out.dtype).float().abs() * {"bf16": 2.0 ** -7, "fp16": 2.0 ** -10}[dtype]).clamp_min(2.0 ** -24)
    assert ((out.float() - ref.to(out.dtype).float()).abs() <= ulp).all()
