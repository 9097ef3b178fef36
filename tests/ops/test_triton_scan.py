"""Triton backend of the four-direction 2D scan against the reference (STYLE.md tolerance rule).

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before anything imports Triton) on the tiny CPU shape set; with one, the same tests run compiled on the
GPU, and the ``gpu`` tests add the DESIGN.md shape set in fp32/bf16/fp16.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

import vmambax_kernels as vk
from vmambax_kernels.selective_scan import reference
from vmambax_kernels.selective_scan import triton as tb
from vmambax_kernels.testing import (CPU_SHAPES, DTYPES, SHAPES, ScanCase, check_against_reference,
                                     scan_inputs)
from vmambax_kernels.testing import TEST_DEVICE as DEV

# The interpreter costs milliseconds per operation; on 2 busy cores this file takes ~1.5 min.
pytestmark = pytest.mark.timeout(300)


def _plain(backend, out_dtype=torch.float32, softplus=True):
    def fn(u, delta, A, B, C, D, delta_bias):
        return vk.selective_scan_2d(u, delta, A, B, C, D, delta_bias, softplus, out_dtype=out_dtype,
                                    backend=backend)
    return fn


def _lowrank_fast(u, dt, dt_projs_weight, A, B, C, D, delta_bias):
    return tb.selective_scan_2d_lowrank(u, dt, dt_projs_weight, A, B, C, D, delta_bias, True, torch.float32)


def _lowrank_ref(u, dt, dt_projs_weight, A, B, C, D, delta_bias):
    return reference.selective_scan_2d_lowrank(u, dt, dt_projs_weight, A, B, C, D, delta_bias, True,
                                               torch.float32)


def _module_inputs(case: ScanCase, dtype, device, seed=0, Bt=None):
    """Arguments of cross_selective_scan_2d at VMamba's init magnitudes, rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    Bt, Dm, N, R = Bt or case.Bt, case.Dm, case.N, case.R
    inp = scan_inputs(case, torch.float32, "cpu", seed, lowrank=True, Bt=Bt)
    return dict(
        x=torch.randn(Bt, Dm, case.H, case.W, generator=g).to(dtype).to(device),
        x_proj_weight=(torch.randn(4, R + 2 * N, Dm, generator=g) * Dm ** -0.5).to(device),
        dt_projs_weight=inp["dt_projs_weight"].to(device),
        dt_projs_bias=inp["delta_bias"].to(device),
        A_logs=torch.log(-inp["A"]).reshape(4 * Dm, N).to(device),
        Ds=inp["D"].reshape(4 * Dm).to(device),
    )


def _module(backend):
    return lambda **a: vk.cross_selective_scan_2d(**a, backend=backend)


# ---------------------------------------------------------------------------------------------
# Tiny shapes: CI runs these under the interpreter; a GPU machine runs them compiled
# ---------------------------------------------------------------------------------------------

def _tiny_planes(name: str, monkeypatch) -> int | None:
    """Planes of a tiny case under the interpreter. dcim_inner_tiny's 37 planes at the default 32 per
    program (32 + 5) were the two largest items of CI's op suite (85 s each under the interpreter,
    whose seq kernels walk a program's planes one after another); 7 planes at 3 per program (3 + 3
    + 1), the tile kernels' groups at 2, keep what the case is for (several planes per program, a
    partial last group, a partial channel block) at a fifth of the time. Compiled on a GPU, all 37."""
    if name != "dcim_inner_tiny" or DEV != "cpu":
        return None
    L = CPU_SHAPES[name].H * CPU_SHAPES[name].W
    monkeypatch.setattr(tb, "_CONFIG_OVERRIDE", dict(planes_positions=2 * L, seq_planes_positions=3 * L))
    cfg = tb.config(7, CPU_SHAPES[name].Dm, L, CPU_SHAPES[name].N, 0)
    assert (cfg.SEQ_BPP, cfg.BPP) == (3, 2), cfg
    return 7


@pytest.mark.parametrize("name", list(CPU_SHAPES))
def test_scan_matches_reference(name, monkeypatch):
    inputs = scan_inputs(CPU_SHAPES[name], torch.float32, DEV, Bt=_tiny_planes(name, monkeypatch))
    check_against_reference(_plain("triton"), _plain("reference"), inputs, device_ref=DEV)


@pytest.mark.parametrize("name", list(CPU_SHAPES))
def test_lowrank_scan_matches_reference(name, monkeypatch):
    inputs = scan_inputs(CPU_SHAPES[name], torch.float32, DEV, lowrank=True, Bt=_tiny_planes(name, monkeypatch))
    check_against_reference(_lowrank_fast, _lowrank_ref, inputs, device_ref=DEV)


@pytest.mark.parametrize("name", ["enc_tiny", "col"])
def test_module_form_with_strided_views(name):
    # dt, B and C reach the kernels as views into one projection; their strides are not copied away.
    inputs = _module_inputs(CPU_SHAPES[name], torch.float32, DEV)
    check_against_reference(_module("triton"), _module("reference"), inputs, device_ref=DEV)


def test_without_D_bias_or_softplus():
    inputs = scan_inputs(CPU_SHAPES["odd_tiny"], torch.float32, DEV, with_D=False, with_bias=False)
    inputs["delta"] = inputs["delta"].abs() * 0.1     # positive step sizes without the softplus
    fast, ref = _plain("triton", softplus=False), _plain("reference", softplus=False)
    check_against_reference(fast, ref, inputs, device_ref=DEV)


def test_half_output_dtype_and_no_grad_saves_nothing():
    inputs = scan_inputs(CPU_SHAPES["row"], torch.float32, DEV)
    with torch.no_grad():
        y = vk.selective_scan_2d(**inputs, out_dtype=torch.bfloat16, backend="triton")
        ref = vk.selective_scan_2d(**inputs, backend="reference")
        _, states = torch.ops.vmambax.ss2d_triton_fwd(
            inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
            inputs["delta_bias"], True, torch.float32, False)
    assert y.dtype == torch.bfloat16
    # bf16 output: the float32 result rounded once (half an ulp of bf16, relative)
    assert ((y.float() - ref).abs() <= 2.0 ** -8 * ref.abs() + 1e-6).all()
    assert states.numel() == 0


def test_bad_input_is_rejected():
    inputs = scan_inputs(CPU_SHAPES["row"], torch.float32, DEV)
    with pytest.raises(TypeError, match="u: expected float32, bfloat16 or float16"):
        tb.selective_scan_2d(**{k: (v.double() if k in "u delta B C" else v) for k, v in inputs.items()},
                             delta_softplus=True, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="N in \\[1, 64\\]"):
        A = torch.zeros(4, inputs["u"].shape[1], 65, device=DEV)
        B = torch.zeros(*inputs["B"].shape[:2], 65, *inputs["B"].shape[3:], device=DEV)
        vk.selective_scan_2d(inputs["u"], inputs["delta"], A, B, B, backend="triton")
    low = scan_inputs(CPU_SHAPES["row"], torch.float32, DEV, lowrank=True)
    with pytest.raises(ValueError, match="dt_projs_weight: expected shape"):
        tb.selective_scan_2d_lowrank(low["u"], low["dt"], low["dt_projs_weight"][:, :, :-1], low["A"], low["B"],
                                     low["C"], low["D"], low["delta_bias"], True, torch.float32)
    with pytest.raises(ValueError, match="dt: expected shape"):
        tb.selective_scan_2d_lowrank(low["u"], low["dt"][:1], low["dt_projs_weight"], low["A"], low["B"],
                                     low["C"], low["D"], low["delta_bias"], True, torch.float32)


def test_availability(monkeypatch):
    assert tb.availability() is None
    assert vk.available_backends()["triton"].available
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET")
        assert "TRITON_INTERPRET=1" in tb.availability()


def _channels_last_5d(t):
    """Same values, strides of a (Bt, H, W, 4, X) buffer: the model's projections give dt this way."""
    return t.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)


def _op_args(lowrank, permuted=False):
    inp = scan_inputs(CPU_SHAPES["row"], torch.float32, DEV, lowrank=lowrank)
    if permuted:
        inp = {k: _channels_last_5d(v) if k in ("dt", "delta", "B", "C") else v for k, v in inp.items()}
    inp = {k: v.requires_grad_(True) for k, v in inp.items()}
    if lowrank:
        return (inp["u"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["delta_bias"],
                inp["dt_projs_weight"], True, torch.float32, True)
    return (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["delta_bias"], True,
            torch.float32, True)


@pytest.mark.parametrize("permuted", [False, True], ids=["dense", "permuted"])
@pytest.mark.parametrize("lowrank", [False, True])
def test_opcheck(lowrank, permuted):
    op = torch.ops.vmambax.ss2d_triton_lowrank_fwd if lowrank else torch.ops.vmambax.ss2d_triton_fwd
    args = _op_args(lowrank, permuted)
    torch.library.opcheck(op.default, args)
    y, states = op(*args)
    w = args[7].detach() if lowrank else None
    bwd_args = (torch.randn_like(y), *[a.detach() for a in args[:7]], w, states.detach(), True)
    # the backward op has no autograd of its own: schema and fake-tensor checks only
    torch.library.opcheck(torch.ops.vmambax.ss2d_triton_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_traces_the_ops():
    inputs = scan_inputs(CPU_SHAPES["row"], torch.float32, DEV)
    torch._dynamo.reset()
    fn = torch.compile(_plain("triton"), fullgraph=True, backend="aot_eager")
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y = fn(**leaves)
    y.sum().backward()
    ref = _plain("reference")(**inputs)
    torch.testing.assert_close(y.detach(), ref, rtol=1e-5, atol=1e-6)
    assert all(v.grad is not None for v in leaves.values())


def test_flop_formula_registered():
    from torch.utils.flop_counter import FlopCounterMode
    case = CPU_SHAPES["row"]
    inputs = scan_inputs(case, torch.float32, DEV)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        vk.selective_scan_2d(**inputs, backend="triton")
    from vmambax_kernels.selective_scan.flops import scan_macs
    assert fc.get_total_flops() == 2 * scan_macs(case.Bt, case.Dm, case.H * case.W, case.N)


# ---------------------------------------------------------------------------------------------
# Sequential backward (the default for N <= 16; forced here with bwd="seq"): forced into several
# chunks of 16 steps (a partial last one where L is not a multiple of 16; dec_tiny: chunks of
# two 16-step segments) and, for the DCIM-like case, several planes per program with a partial
# last group; every CPU case has its channels in one partial block and runs the four walks (two
# of them reversed).
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def seq_bwd(monkeypatch):
    def use(**extra):
        monkeypatch.setattr(tb, "_CONFIG_OVERRIDE", dict(dict(bwd="seq", seq_tc=16), **extra))
        assert tb.config(1, 8, 64, 4, 1).bwd_seq
    use()
    return use


# dcim_inner_tiny cut to 3 planes (its 37 take over a minute under the interpreter); 2 per program
_SEQ_CASES = dict(CPU_SHAPES, dcim_inner_tiny=ScanCase("dcim_inner_tiny", 3, 6, 4, 4, 16))


@pytest.mark.parametrize("name", list(_SEQ_CASES))
def test_seq_bwd_lowrank_matches_reference(name, seq_bwd):
    if name == "dcim_inner_tiny":
        seq_bwd(seq_planes_positions=32)
    if name == "dec_tiny":
        seq_bwd(seq_tc=32)
    inputs = scan_inputs(_SEQ_CASES[name], torch.float32, DEV, lowrank=True)
    check_against_reference(_lowrank_fast, _lowrank_ref, inputs, device_ref=DEV)


@pytest.mark.parametrize("name,fwd", [("row", "seq"), ("n1", "seq"), ("col", "tile")])
def test_seq_bwd_plain_matches_reference(name, fwd, seq_bwd):
    seq_bwd(fwd=fwd)   # the tile forward saves the same states (every 16 steps)
    inputs = scan_inputs(CPU_SHAPES[name], torch.float32, DEV)
    check_against_reference(_plain("triton"), _plain("reference"), inputs, device_ref=DEV)


@pytest.mark.parametrize("name", ["enc_tiny", "odd_tiny", "dot"])
def test_tile_bwd_matches_reference(name, monkeypatch):
    monkeypatch.setattr(tb, "_CONFIG_OVERRIDE", dict(bwd="tile"))   # the default takes it for N > 16 only
    inputs = scan_inputs(CPU_SHAPES[name], torch.float32, DEV, lowrank=True)
    check_against_reference(_lowrank_fast, _lowrank_ref, inputs, device_ref=DEV)


def test_seq_bwd_without_D_bias_or_softplus(seq_bwd):
    inputs = scan_inputs(CPU_SHAPES["row"], torch.float32, DEV, with_D=False, with_bias=False)
    inputs["delta"] = inputs["delta"].abs() * 0.1
    fast, ref = _plain("triton", softplus=False), _plain("reference", softplus=False)
    check_against_reference(fast, ref, inputs, device_ref=DEV)


# ---------------------------------------------------------------------------------------------
# GPU: the DESIGN.md shape set, fp32/bf16/fp16, and random odd shapes
# ---------------------------------------------------------------------------------------------

def _gpu_case(case: ScanCase) -> ScanCase:
    """The reference loops over L in Python and keeps (Bt, 4, Dm, L, N) fp64 tensors: cut the batch
    (and the channels of big planes) so one check stays within seconds. Kernel paths unchanged:
    several channel blocks, several planes per program and several chunks remain."""
    L = case.H * case.W
    if L >= 4096:
        return ScanCase(case.name, 1, 24, case.H, case.W, case.N)
    if L >= 256:
        return ScanCase(case.name, 2, min(case.d_model, 48), case.H, case.W, case.N)
    return ScanCase(case.name, min(case.Bt, 64), min(case.d_model, 96), case.H, case.W, case.N)


_HALF_CASES = ["enc3", "dcim_outer2", "dcim_inner1", "dec1", "odd"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(SHAPES))
def test_gpu_shape_set(name, dtype):
    if dtype != "fp32" and name not in _HALF_CASES:
        pytest.skip("16-bit inputs are checked on a subset of the shape set to bound the run time")
    case = _gpu_case(SHAPES[name])
    inputs = scan_inputs(case, DTYPES[dtype], DEV)
    check_against_reference(_plain("triton"), _plain("reference"), inputs, device_ref=DEV)
    low = scan_inputs(case, DTYPES[dtype], DEV, lowrank=True, seed=1)
    check_against_reference(_lowrank_fast, _lowrank_ref, low, device_ref=DEV)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(6))
def test_gpu_random_odd_shapes(seed):
    g = torch.Generator().manual_seed(100 + seed)
    H, W = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
    d_model = int(torch.randint(1, 40, (1,), generator=g))
    N = int(torch.randint(1, 65, (1,), generator=g))
    Bt = int(torch.randint(1, 6, (1,), generator=g))
    case = ScanCase(f"random{seed}", Bt, d_model, H, W, N)
    dtype = list(DTYPES.values())[seed % 3]
    check_against_reference(_plain("triton"), _plain("reference"), scan_inputs(case, dtype, DEV), device_ref=DEV)
    # fp32 only: with 16-bit x the fast path rounds the projected dt, B, C to 16 bits while ref64
    # projects in fp64, which the tolerance rule (inputs rounded, not intermediates) does not cover
    check_against_reference(_module("triton"), _module("reference"), _module_inputs(case, torch.float32, DEV),
                            device_ref=DEV)


# the same GPU checks with each backward forced (the default takes seq for N <= 16, tile above)
@pytest.mark.gpu
@pytest.mark.parametrize("bwd", ["seq", "tile"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(SHAPES))
def test_gpu_shape_set_forced_bwd(name, dtype, bwd, monkeypatch):
    monkeypatch.setattr(tb, "_CONFIG_OVERRIDE", dict(bwd=bwd))
    test_gpu_shape_set(name, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("bwd", ["seq", "tile"])
@pytest.mark.parametrize("seed", range(6))
def test_gpu_random_odd_shapes_forced_bwd(seed, bwd, monkeypatch):
    monkeypatch.setattr(tb, "_CONFIG_OVERRIDE", dict(bwd=bwd))
    test_gpu_random_odd_shapes(seed)


def _lowrank_op_fwd_bwd(x):
    """y and the eight gradients of the low-rank ops, for a fixed grad_y."""
    u, dt, A, B, C, D, bias, w = (x[k] for k in ("u", "dt", "A", "B", "C", "D", "delta_bias", "dt_projs_weight"))
    y, states = torch.ops.vmambax.ss2d_triton_lowrank_fwd(u, dt, A, B, C, D, bias, w, True, torch.float32, True)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.device)
    return (y, *torch.ops.vmambax.ss2d_triton_bwd(gy, u, dt, A, B, C, D, bias, w, states, True))


def _check_runs_agree(case, bwd, monkeypatch):
    monkeypatch.setattr(tb, "_CONFIG_OVERRIDE", dict(bwd=bwd))
    x = scan_inputs(case, torch.float32, DEV, lowrank=True)
    first, second = _lowrank_op_fwd_bwd(x), _lowrank_op_fwd_bwd(x)
    names = ("y", "du", "d dt", "dA", "dB", "dC", "dD", "d bias", "dW")
    for name, a, b in zip(names, first, second):
        if name in ("d dt", "dB", "dC"):
            # float64 sums of more than four fp32 addends: the same after rounding but for rare ties
            ulp = torch.finfo(torch.float32).eps * b.abs()
            assert bool(((a - b).abs() <= ulp).all()), f"{name}: runs differ by more than an ulp"
            assert int((a != b).sum()) <= max(1, a.numel() // 100000), f"{name}: runs differ in many elements"
        else:
            # y and du: four fp32 addends per element sum exactly in float64; the parameter
            # gradients are host sums of per-program rows
            assert torch.equal(a, b), f"{name}: runs differ"


# Two runs of the same inputs give the same results: the atomics' sums (y, du, dB, dC, d dt) are
# float64 buffers (with fp32 buffers they varied from run to run on the GPU).
@pytest.mark.gpu
@pytest.mark.parametrize("bwd", ["seq", "tile"])
@pytest.mark.parametrize("name", ["enc1", "dcim_inner1", "dec3"])
def test_gpu_runs_agree(name, bwd, monkeypatch):
    c = SHAPES[name]
    _check_runs_agree(ScanCase(name, min(c.Bt, 2 if c.H * c.W >= 4096 else 1024), c.d_model, c.H, c.W, c.N),
                      bwd, monkeypatch)
