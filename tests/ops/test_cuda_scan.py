"""The cuda backend against the reference (STYLE.md's tolerance rule), on a GPU.

Whole shape set of DESIGN.md (batch cut down where the float64 reference would be slow or too
large), random odd shapes, fp32/bf16/fp16, the output and every gradient; determinism of the
forward and of the fp32 backward; registration (opcheck, torch.compile fullgraph); bad input. Skipped without a GPU.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import vmambax_kernels as vk
from vmambax_kernels.selective_scan import reference
from vmambax_kernels.testing import DTYPES, SHAPES, ScanCase, check_against_reference, run_with_grads, scan_inputs

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    from vmambax_kernels.selective_scan import cuda
    why = cuda.availability()
    if why:
        pytest.skip(f"cuda backend unavailable: {why}")


def _batch(case: ScanCase) -> int:
    """Planes to test: the float64 reference keeps (Bt, 4, Dm, L, N) tensors and loops over L."""
    per_plane = 4 * case.Dm * case.H * case.W * case.N * 8 * 6  # bytes, ~6 live fp64 copies
    return max(1, min(case.Bt, 2, int(2e9 // per_plane))) if case.H * case.W > 16 else min(case.Bt, 64)


def _ref_device():
    return "cuda"  # the reference in float64 on the GPU: same rule, minutes less


def _fast(**kw):
    return vk.selective_scan_2d(**kw, backend="cuda")


def _fast_lowrank(**kw):
    from vmambax_kernels.selective_scan import cuda
    return cuda.selective_scan_2d_lowrank(kw["u"], kw["dt"], kw["dt_projs_weight"], kw["A"], kw["B"], kw["C"],
                                          kw["D"], kw["delta_bias"], True, torch.float32)


def _ref_lowrank(**kw):
    return reference.selective_scan_2d_lowrank(kw["u"], kw["dt"], kw["dt_projs_weight"], kw["A"], kw["B"],
                                               kw["C"], kw["D"], kw["delta_bias"], True, torch.float32)


def _ref(**kw):
    return reference.selective_scan_2d(**kw)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(SHAPES))
def test_op_matches_reference(name, dtype):
    case = SHAPES[name]
    inputs = scan_inputs(case, DTYPES[dtype], "cuda", seed=3, Bt=_batch(case))
    check_against_reference(_fast, _ref, inputs, torch.float32, device_ref=_ref_device())


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(SHAPES))
def test_lowrank_matches_reference(name, dtype):
    case = SHAPES[name]
    inputs = scan_inputs(case, DTYPES[dtype], "cuda", seed=4, lowrank=True, Bt=_batch(case))
    check_against_reference(_fast_lowrank, _ref_lowrank, inputs, torch.float32, device_ref=_ref_device())


@pytest.mark.parametrize("seed", range(6))
def test_random_odd_shapes(seed):
    g = torch.Generator().manual_seed(100 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    N = [1, 7, 16, 33, 64, 4][seed]
    case = ScanCase(f"rand{seed}", r(1, 5), r(1, 24), r(1, 41), r(1, 41), N)
    dtype = [torch.float32, torch.bfloat16, torch.float16][seed % 3]
    opts = dict(with_D=seed % 2 == 0, with_bias=seed % 3 != 1)
    inputs = scan_inputs(case, dtype, "cuda", seed=seed, **opts)
    softplus = seed != 2
    if not softplus:  # raw steps must be positive, or the state grows past fp32 (in the reference too)
        inputs["delta"] = (inputs["delta"].float().abs() * 0.05 + 1e-3).to(dtype)
        inputs["delta_bias"] = None
    fast = functools.partial(_fast, delta_softplus=softplus)
    ref = functools.partial(_ref, delta_softplus=softplus)
    check_against_reference(fast, ref, inputs, torch.float32, device_ref=_ref_device())
    lr = scan_inputs(case, dtype, "cuda", seed=seed, lowrank=True)
    check_against_reference(_fast_lowrank, _ref_lowrank, lr, torch.float32, device_ref=_ref_device())


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_16bit_output(out_dtype):
    case = SHAPES["odd"]
    inputs = scan_inputs(case, torch.bfloat16, "cuda", seed=7)
    fast = functools.partial(_fast, out_dtype=out_dtype)
    ref = functools.partial(_ref, out_dtype=out_dtype)
    check_against_reference(fast, ref, inputs, out_dtype, device_ref=_ref_device())


@pytest.mark.parametrize("name", ["enc1", "dcim_inner1", "rect1"])
def test_forward_is_deterministic(name):
    inputs = scan_inputs(SHAPES[name], torch.bfloat16, "cuda", seed=5)
    ys = [_fast(**inputs) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])


def test_strided_views_like_cross_selective_scan():
    """dt, B, C as splits of one (Bt, 4, R+2N, H, W) tensor: outer strides passed, no copy."""
    case = SHAPES["odd"]
    inputs = scan_inputs(case, torch.bfloat16, "cuda", seed=8, lowrank=True)
    dbl = torch.cat([inputs["dt"], inputs["B"], inputs["C"]], dim=2)
    dt, B, C = torch.split(dbl, [case.R, case.N, case.N], dim=2)
    assert not B.is_contiguous()
    strided = dict(inputs, dt=dt, B=B, C=C)
    check_against_reference(_fast_lowrank, _ref_lowrank, strided, torch.float32, device_ref=_ref_device())


def test_cross_selective_scan_2d_matches_reference_backend():
    case = ScanCase("core", 2, 24, 9, 14, 16)
    g = torch.Generator().manual_seed(0)
    Dm, N, R = case.Dm, case.N, case.R
    # fp32 activations: with bf16 ones the projections round dt/B/C to bf16 on the fast path only,
    # which the rule (references in fp32/fp64 on the same inputs) would count as kernel error.
    args = dict(x=torch.randn(2, Dm, case.H, case.W, generator=g).cuda(),
                x_proj_weight=(torch.randn(4, R + 2 * N, Dm, generator=g) * Dm ** -0.5).cuda(),
                dt_projs_weight=(torch.rand(4, Dm, R, generator=g) - 0.5).cuda(),
                dt_projs_bias=torch.log(torch.expm1(torch.full((4, Dm), 0.01))).cuda(),
                A_logs=torch.log(torch.arange(1, N + 1.0)).repeat(4 * Dm, 1).cuda(),
                Ds=torch.ones(4 * Dm).cuda())
    fast = functools.partial(vk.cross_selective_scan_2d, backend="cuda")
    ref = functools.partial(vk.cross_selective_scan_2d, backend="reference")
    check_against_reference(fast, ref, args, torch.float32, device_ref="cuda")


def test_no_nonfinite_fp16_at_512():
    """enc1 (the 512x512 model's first stage) in fp16 with large activations: finite y and grads."""
    inputs = scan_inputs(SHAPES["enc1"], torch.float16, "cuda", seed=9, lowrank=True, Bt=2)
    inputs["u"] = (inputs["u"].float() * 8).half()
    leaves = {k: (v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    y = _fast_lowrank(**leaves)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all()
    for k, v in leaves.items():
        if isinstance(v, torch.Tensor):
            assert torch.isfinite(v.grad).all(), k


def test_model_fp16_activations_at_512_are_finite():
    models = pytest.importorskip("vmambax.models")
    if not hasattr(models, "VMambaX"):
        pytest.skip("vmambax.models.VMambaX not there yet")
    torch.manual_seed(0)
    model = models.VMambaX().cuda().eval()
    ct, pet = torch.randn(1, 1, 512, 512, device="cuda"), torch.randn(1, 1, 512, 512, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        out = model(ct, pet)
    assert torch.isfinite(out).all()


def test_opcheck_registered_ops():
    from vmambax_kernels.selective_scan import cuda
    case = ScanCase("tiny", 2, 6, 5, 7, 4)
    x = scan_inputs(case, torch.float32, "cuda", seed=1)
    lr = scan_inputs(case, torch.float32, "cuda", seed=1, lowrank=True)
    for dtype in (torch.float32, torch.bfloat16):
        args = (x["u"].to(dtype), x["delta"].to(dtype), x["A"], x["B"].to(dtype), x["C"].to(dtype), x["D"],
                x["delta_bias"], True, torch.float32, True)
        torch.library.opcheck(torch.ops.vmambax.ss2d_cuda_fwd.default, args)
        args = (lr["u"].to(dtype), lr["dt"].to(dtype), lr["A"], lr["B"].to(dtype), lr["C"].to(dtype), lr["D"],
                lr["delta_bias"], lr["dt_projs_weight"], True, torch.float32, True)
        torch.library.opcheck(torch.ops.vmambax.ss2d_lowrank_cuda_fwd.default, args)
    assert cuda.availability() is None


def test_torch_compile_fullgraph():
    inputs = scan_inputs(ScanCase("c", 2, 8, 6, 9, 16), torch.bfloat16, "cuda", seed=2)
    leaves = {k: (v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    compiled = torch.compile(lambda **kw: _fast(**kw).square().sum(), fullgraph=True)
    loss = compiled(**leaves)
    loss.backward()
    eager = _fast(**inputs).square().sum()
    # the scan is the same kernel; inductor's fused square-sum adds in another order (fp32 rounding)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=0)
    assert all(v.grad is not None for v in leaves.values() if isinstance(v, torch.Tensor))


def test_flop_counter_sees_the_op():
    from torch.utils.flop_counter import FlopCounterMode
    from vmambax_kernels.selective_scan.flops import scan_macs
    case = ScanCase("f", 2, 8, 6, 9, 16)
    inputs = scan_inputs(case, torch.bfloat16, "cuda", seed=2)
    with FlopCounterMode(display=False) as fc:
        _fast(**inputs)
    assert fc.get_total_flops() == 2 * scan_macs(2, case.Dm, case.H * case.W, case.N, True)


def test_bad_input_is_rejected_with_the_argument_name():
    from vmambax_kernels.selective_scan import cuda
    x = scan_inputs(ScanCase("b", 1, 4, 3, 5, 4), torch.float32, "cuda", seed=0)
    bad = dict(x, u=x["u"].double(), delta=x["delta"].double(), B=x["B"].double(), C=x["C"].double())
    with pytest.raises(TypeError, match="u"):
        cuda.selective_scan_2d(**bad, delta_softplus=True, out_dtype=torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        cuda.selective_scan_2d(**x, delta_softplus=True, out_dtype=torch.float64)
    # the C++ checks themselves, in a child process so that a crash is reported, not fatal
    code = (
        "import torch, vmambax_kernels.selective_scan.cuda as c\n"
        "from vmambax_kernels.testing import ScanCase, scan_inputs\n"
        "x = scan_inputs(ScanCase('b', 1, 4, 3, 5, 4), torch.float32, 'cuda', seed=0)\n"
        "for bad, what in ((dict(A=x['A'][:, :, :2].contiguous()), 'B: expected shape'),\n"
        "                  (dict(delta=x['delta'][:, :, :2]), 'delta: expected shape'),\n"
        "                  (dict(A=x['A'][:, :, :2]), 'A: expected a contiguous')):\n"
        "    a = dict(x, **bad)\n"
        "    try:\n"
        "        torch.ops.vmambax.ss2d_cuda_fwd(a['u'], a['delta'], a['A'], a['B'], a['C'], None, None, True,\n"
        "                                        torch.float32, False)\n"
        "    except RuntimeError as e:\n"
        "        assert what in str(e), (what, str(e)[:300])\n"
        "    else:\n"
        "        raise AssertionError('no error for ' + what)\n"
        "print('checks ok')\n")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or "checks ok" not in r.stdout:  # pytest.fail keeps the whole trace (an assert's repr cuts it)
        pytest.fail(f"child exited {r.returncode}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-8000:]}")
    # a transposed (non-dense) plane is copied by the wrapper, never read wrongly
    t = dict(x, u=x["u"].transpose(2, 3).contiguous().transpose(2, 3))
    torch.testing.assert_close(_fast(**t), _fast(**x), rtol=0, atol=0)
    assert math.isfinite(float(_fast(**x).sum()))


# ---- chunk logic (csrc/selective_scan: chunks of 64 positions, sub-tiles of 16, state buckets) ----

EXTRA = {"n1": ScanCase("n1", 2, 24, 19, 23, 1),      # N = 1 (bucket 4), L = 437: 7 chunks, a partial one
         "n33": ScanCase("n33", 2, 20, 21, 17, 33),   # N = 33 (bucket 64), Dm 40: 2 warps, 8 threads idle
         "row1": ScanCase("row1", 2, 8, 1, 131, 16),  # H = 1: one column walk step per column
         "col1": ScanCase("col1", 2, 8, 97, 1, 4),
         "dot": ScanCase("dot", 6, 8, 1, 1, 16)}     # L = 1 (DCIM's outer 1x1 map): grad A must be exactly 0


@pytest.mark.parametrize("lowrank", [False, True], ids=["full", "lowrank"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(EXTRA))
def test_chunk_edges_match_reference(name, dtype, lowrank):
    case = EXTRA[name]
    inputs = scan_inputs(case, DTYPES[dtype], "cuda", seed=11, lowrank=lowrank)
    if lowrank:
        check_against_reference(_fast_lowrank, _ref_lowrank, inputs, torch.float32, device_ref=_ref_device())
    else:
        check_against_reference(_fast, _ref, inputs, torch.float32, device_ref=_ref_device())


@pytest.mark.parametrize("name", ["odd", "n1"])
def test_no_softplus_no_D(name):
    case = EXTRA.get(name) or SHAPES[name]
    inputs = scan_inputs(case, torch.float32, "cuda", seed=12, with_D=False, Bt=min(case.Bt, 2))
    inputs["delta"] = inputs["delta"].abs() * 0.05 + 1e-3
    inputs["delta_bias"] = None
    check_against_reference(functools.partial(_fast, delta_softplus=False),
                            functools.partial(_ref, delta_softplus=False), inputs, torch.float32,
                            device_ref=_ref_device())


@pytest.mark.parametrize("name", ["enc1", "dcim_inner1", "rect1", "odd"])
def test_lowrank_forward_is_deterministic(name):
    case = SHAPES[name]
    inputs = scan_inputs(case, torch.bfloat16, "cuda", seed=5, lowrank=True, Bt=min(case.Bt, 2 if case.H > 4 else 512))
    with torch.no_grad():
        ys = [_fast_lowrank(**inputs) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])


@pytest.mark.parametrize("lowrank", [False, True], ids=["full", "lowrank"])
@pytest.mark.parametrize("name", ["enc1", "dcim_inner1", "rect1", "enc3", "dcim_inner3"])
def test_fp32_backward_is_deterministic(name, lowrank):
    """fp32 inputs: the op's backward three times on one forward's saved states gives bitwise equal
    du, ddelta / ddt, dA, dB, dC, dD, d delta_bias, dW. Every cross-block sum is accumulated in
    float64 and rounded to fp32 once (csrc/selective_scan/ss2d.h: SS2DAcc). Dm 96 (enc1,
    dcim_inner1, rect1) is one block of channels, so fp32 atomics into dB / dC / ddt had one addend
    per (b, chunk) there; Dm 384 (enc3, dcim_inner3) is three blocks of 128, whose fp32 sums
    depended on the blocks' order."""
    case = SHAPES[name]
    inputs = scan_inputs(case, torch.float32, "cuda", seed=14, lowrank=lowrank,
                         Bt=min(case.Bt, 2 if case.H > 4 else 512))
    dl_name = "dt" if lowrank else "delta"
    args = [inputs[k] for k in ("u", dl_name, "A", "B", "C", "D", "delta_bias")]
    W = inputs["dt_projs_weight"] if lowrank else None
    fwd = torch.ops.vmambax.ss2d_lowrank_cuda_fwd if lowrank else torch.ops.vmambax.ss2d_cuda_fwd
    with torch.no_grad():
        y, states = fwd(*args, *([W] if lowrank else []), True, torch.float32, True)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
        runs = [torch.ops.vmambax.ss2d_cuda_bwd(dy, *args, W, states, True) for _ in range(3)]
    names = ["du", "d" + dl_name, "dA", "dB", "dC", "dD", "d delta_bias", "dW"]
    for k, first, *rest in zip(names, *runs):
        assert first.dtype == torch.float32 and torch.isfinite(first).all(), k
        assert all(torch.equal(first, g) for g in rest), k
    assert runs[0][7].numel() == (W.numel() if lowrank else 0)


# ---- saved states (the forward's entering states feed the op's backward) ----

@pytest.mark.parametrize("lowrank", [False, True], ids=["full", "lowrank"])
@pytest.mark.parametrize("name", ["odd", "dec3", "n1", "n33"])
def test_saved_states_feed_the_backward(name, lowrank):
    """The ops called directly: the forward bitwise the same with and without saved states and as
    through autograd; the backward on the saved states gives autograd's gradients (same kernels on
    the same values; compared within fp32 summation-order noise, though with these fp32 inputs they
    are bitwise equal in practice: test_fp32_backward_is_deterministic)."""
    case = EXTRA.get(name) or SHAPES[name]
    inputs = scan_inputs(case, torch.float32, "cuda", seed=13, lowrank=lowrank, Bt=min(case.Bt, 2))
    dl_name = "dt" if lowrank else "delta"
    y, grads = run_with_grads(_fast_lowrank if lowrank else _fast, inputs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)  # run_with_grads' grad_out
    args = [inputs[k] for k in ("u", dl_name, "A", "B", "C", "D", "delta_bias")]
    W = [inputs["dt_projs_weight"]] if lowrank else []
    fwd = torch.ops.vmambax.ss2d_lowrank_cuda_fwd if lowrank else torch.ops.vmambax.ss2d_cuda_fwd
    with torch.no_grad():
        y_saved, states = fwd(*args, *W, True, torch.float32, True)
        y_plain, empty = fwd(*args, *W, True, torch.float32, False)
        g = torch.ops.vmambax.ss2d_cuda_bwd(dy, *args, W[0] if W else None, states, True)
    assert torch.equal(y_saved, y) and torch.equal(y_plain, y) and empty.numel() == 0
    names = ["u", dl_name, "A", "B", "C", "D", "delta_bias", "dt_projs_weight"]
    for k, mine in zip(names, g):
        if k in grads:
            ref = grads[k]
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()), msg=k)


# ---- the asynchronous staging (cp.async) against the direct loads ----

def _off_boundary(t: torch.Tensor) -> torch.Tensor:
    """The same values, contiguous, in storage that starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return buf[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["enc3", "dec3", "rect1"])
def test_async_staging_equals_direct_loads(name, dtype):
    """Low-rank inputs whose rows are 16-byte aligned are staged by cp.async in the forward passes and
    the backward's chunk pass (ss2d.h: ss2d_fwd_async_ok, ss2d_bwd_async_ok); with C one element off
    a 16-byte boundary every pass loads directly. The same values staged either way: y, du, dA, dD,
    d delta_bias and dW bitwise equal (written in a fixed order or summed in float64), and with fp32
    inputs every gradient (their float64 sums make the whole backward deterministic)."""
    case = SHAPES[name]
    inputs = scan_inputs(case, DTYPES[dtype], "cuda", seed=15, lowrank=True, Bt=2)
    assert case.H * case.W % 8 == 0 and case.H * case.W > 64  # aligned rows, several chunks
    args = [inputs[k] for k in ("u", "dt", "A", "B", "C", "D", "delta_bias")]
    W = inputs["dt_projs_weight"]
    runs = []
    with torch.no_grad():
        for C in (inputs["C"], _off_boundary(inputs["C"])):
            assert (C.data_ptr() % 16 == 0) == (not runs)
            a = args[:4] + [C] + args[5:]
            y, states = torch.ops.vmambax.ss2d_lowrank_cuda_fwd(*a, W, True, torch.float32, True)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(y)
            runs.append((y, *torch.ops.vmambax.ss2d_cuda_bwd(dy, *a, W, states, True)))
    names = ["y", "du", "ddt", "dA", "dB", "dC", "dD", "d delta_bias", "dW"]
    exact = names if dtype == "fp32" else ["y", "du", "dA", "dD", "d delta_bias", "dW"]
    for k, a, b in zip(names, *runs):
        assert torch.isfinite(a).all(), k
        if k in exact:
            assert torch.equal(a, b), k
        else:  # float atomics in the blocks' order (ss2d.h: SS2DAcc): summation-order noise, as above
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()), msg=k)
