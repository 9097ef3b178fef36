"""Triton CGM gate vs the reference: output and every gradient, both variants, odd sizes, layouts.

CPU: the kernels run under TRITON_INTERPRET=1 on tiny shapes. GPU (-m gpu): the four encoder
stage shapes and a non-square one in every dtype. Tolerance: STYLE.md's rule (vmambax_kernels.testing).
"""
import math

import pytest
import torch

import vmambax_kernels as vk
from vmambax_kernels.cgm import triton as cgm_triton
from vmambax_kernels.testing import (DTYPES, ON_GPU, TEST_DEVICE as DEVICE, RoundGrad,
                                     assert_close_by_rule, check_against_reference, run_with_grads)

pytestmark = pytest.mark.timeout(120)


# What the config fixture (conftest.py) sets for one test: strip rows, column tiles, channel blocks
CONFIG_OVERRIDE = cgm_triton.CONFIG_OVERRIDE


def cgm_inputs(Bt, C, H, W, dtype, device=DEVICE, seed=0, channels_last=False):
    """Realistic magnitudes: x ~ N(0, 1) rounded to dtype, c in (0, 1), conv logits of std ~1."""
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def x():
        return torch.randn(Bt, C, H, W, generator=g).to(dtype).to(device).contiguous(memory_format=fmt)

    def w():
        return (torch.randn(1, 2 * C, 3, 3, generator=g) / math.sqrt(18 * C)).to(device)

    def c():
        return torch.sigmoid(torch.randn(Bt, C, generator=g)).to(device)

    return dict(x_ct=x(), x_pet=x(), c_ct=c(), c_pet=c(), w_ct=w(), w_pet=w())


def pair(backend, dtype, residual):
    """cgm_gate as one tensor (both outputs flattened), as check_against_reference expects."""
    def fn(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet):
        y = vk.cgm_gate(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual, backend=backend)
        return torch.cat([RoundGrad.apply(t, dtype).flatten() for t in y])
    return fn


def check(inputs, dtype, residual, device_ref="cpu"):
    check_against_reference(pair("triton", dtype, residual), pair("reference", dtype, residual),
                            inputs, out_dtype=dtype, device_ref=device_ref)


# ---------------------------------------------------------------------------------------------
# CPU (interpreter), tiny shapes
# ---------------------------------------------------------------------------------------------
# H != W, H = 1, W = 1, C not a multiple of the 16-channel block, several channel blocks.
TINY = {"rect": (2, 5, 6, 7), "row": (1, 3, 1, 9), "col": (2, 20, 5, 1), "blocks": (1, 37, 3, 4)}


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(TINY), ids=list(TINY))
def test_matches_reference_tiny(shape, dtype, residual):
    check(cgm_inputs(*TINY[shape], DTYPES[dtype], device="cpu"), DTYPES[dtype], residual)


# Strips of 2 rows (each program streams several rows, halo rows at both ends) and column tiles
# of 16 pixels (W = 37 > 16: three tiles overlapping by their halo columns).
@pytest.mark.parametrize("config", [{k: dict(rows=2, max_tw=16) for k in ("fwd", "bwd")}], indirect=True)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_strips_and_column_tiles(config, dtype):
    check(cgm_inputs(3, 6, 11, 37, DTYPES[dtype], device="cpu", seed=3), DTYPES[dtype], True)


# The launch configurations benchmarks/bench_cgm.py --sweep may pick (channel blocks, strip rows).
# The backward's dz pass on channel blocks other than the gating's (bcz 32 against BC 16, the 16-bit
# default at cgm1 and cgm3; 37 channels: 2 blocks against 3), with the L2 eviction hints (which the
# interpreter ignores).
SWEPT = [dict(fwd=dict(BC=32, rows=1), bwd=dict(BC=64, rows=3)), dict(fwd=dict(BC=16, rows=4), bwd=dict(BC=16, rows=8)),
         dict(bwd=dict(BC=16, bcz=32, evict=True, rows=2))]


@pytest.mark.parametrize("config", SWEPT, indirect=True, ids=["rows1", "rows4", "bcz32"])
def test_swept_configs(config):
    check(cgm_inputs(2, 37, 9, 6, torch.bfloat16, device="cpu", seed=13), torch.bfloat16, True)


# The variants bench_cgm.py --sweep times (cgm_triton.VARIANTS): output and every gradient on tiny
# shapes, residual and plain, H != W, C not a multiple of the channel block (37), one column tile
# (W 20) and, for max_tw variants, several (W 37 > 16 with max_tw forced to 16), 2-row strips.
VARIANT_SHAPES = {"rect": (2, 37, 9, 20), "tiles": (1, 20, 5, 37)}  # rect: TWP 32 (ONE_TILE on)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("shape", list(VARIANT_SHAPES))
@pytest.mark.parametrize("variant", list(cgm_triton.VARIANTS))
def test_variants(variant, shape, residual):
    for kind, cfg in cgm_triton.VARIANTS[variant].items():
        cfg = dict(cfg, rows=2)
        if shape == "tiles":
            cfg["max_tw"] = 16
        cgm_triton.CONFIG_OVERRIDE[kind] = cfg
    try:
        check(cgm_inputs(*VARIANT_SHAPES[shape], torch.bfloat16, device="cpu", seed=17), torch.bfloat16, residual)
    finally:
        cgm_triton.CONFIG_OVERRIDE.clear()


@pytest.mark.parametrize("variant", [v for v in cgm_triton.VARIANTS if "fwd" in cgm_triton.VARIANTS[v]])
def test_variants_fp32_channels_last(variant):
    cgm_triton.CONFIG_OVERRIDE.update(cgm_triton.VARIANTS[variant])
    try:
        check(cgm_inputs(2, 18, 5, 6, torch.float32, device="cpu", seed=19, channels_last=True), torch.float32, True)
    finally:
        cgm_triton.CONFIG_OVERRIDE.clear()


# The GEMM form (config key "gemm") with 16-pixel tiles: several tiles per plane (a partial last
# one), several per dW chunk, C not a multiple of the 16-channel block; channels-first, channels-last
# and sliced planes (h, w strides that do not merge: the per-pixel division path), H = 1, W = 1.
GEMM_SMALL = {"fwd": dict(gemm=dict(BP=16, BC=16)), "bwd": dict(gemm=dict(BP=16, BC=16, dw=dict(BP=16, BC=16)))}
# ... and with the forward's shift-sum and gating fused (config "fuse_apply"), 16-pixel tiles, two
# channel groups per tile where C has two 16-channel blocks (group 1 recomputes s and does not store it)
GEMM_SMALL_FUSED = {"fwd": dict(gemm=dict(BP=16, BC=16, fuse_apply=True, apply=dict(BP=16, BC=16, groups=2))),
                    "bwd": GEMM_SMALL["bwd"]}
GEMM_CASES = {"first_bf16": ((2, 20, 7, 9), "first", torch.bfloat16, True),
              "last_fp32": ((2, 20, 7, 9), "last", torch.float32, True),
              "sliced_fp32_plain": ((2, 20, 7, 9), "sliced", torch.float32, False),
              "sliced_fp16": ((1, 18, 5, 6), "sliced", torch.float16, True),
              "row_bf16": ((1, 3, 1, 40), "first", torch.bfloat16, True),
              "col_fp32_plain": ((2, 20, 37, 1), "last", torch.float32, False)}


@pytest.mark.parametrize("config", [GEMM_SMALL, GEMM_SMALL_FUSED], indirect=True, ids=["gemm16", "gemm16_fused"])
@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_gemm_small_tiles(config, case):
    shape, layout, dtype, residual = GEMM_CASES[case]
    if layout != "sliced":
        check(cgm_inputs(*shape, dtype, device="cpu", seed=23, channels_last=layout == "last"), dtype, residual)
        return

    def sliced(backend):   # columns 1..W of planes W + 2 wide, sliced inside (the leaves are copied)
        def fn(x_ct, x_pet, **kw):
            x_ct, x_pet = x_ct[..., 1:-1], x_pet[..., 1:-1]
            assert backend == "reference" or not cgm_triton._flat(x_ct, x_pet)
            return pair(backend, dtype, residual)(x_ct, x_pet, **kw)
        return fn
    inputs = cgm_inputs(*shape[:3], shape[3] + 2, dtype, device="cpu", seed=23)
    check_against_reference(sliced("triton"), sliced("reference"), inputs, out_dtype=dtype)


def forwards_agree(inputs, residual, base, fused):
    """The GEMM forward in three launches (config ``base``) and with shift-sum and gating fused
    (``fused``): y_ct, y_pet and s bit for bit (the fused kernel sums P's taps in the shift
    kernel's order, triton_gemm._fused_s, gates as the apply kernel does, rounds y once)."""
    outs = []
    for cfg in (base, fused):
        cgm_triton.CONFIG_OVERRIDE.update(cfg)
        try:
            with torch.no_grad():
                outs.append(cgm_triton._forward(*inputs.values(), residual))
        finally:
            cgm_triton.CONFIG_OVERRIDE.clear()
    for name, a, b in zip(("y_ct", "y_pet", "s"), *outs):
        assert a.stride() == b.stride(), name
        assert torch.equal(a, b), f"{name}: {(a.float() - b.float()).abs().max().item()} max difference"


# Odd tiny shapes: C not a multiple of 16 (several groups), H = 1, W = 1, channels-last, fp32 and bf16
FUSED_CASES = {"first_bf16": ((2, 37, 7, 9), False, torch.bfloat16, True),
               "last_fp32_plain": ((2, 20, 5, 6), True, torch.float32, False),
               "row_bf16_plain": ((1, 20, 1, 33), False, torch.bfloat16, False),
               "col_fp32": ((2, 37, 19, 1), True, torch.float32, True)}


@pytest.mark.parametrize("groups", [None, 2, 3], ids=["groups_auto", "groups2", "groups3"])
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_apply_matches_three_launches(case, groups):
    shape, last, dtype, residual = FUSED_CASES[case]
    apply = dict(BP=16, BC=16) if groups is None else dict(BP=16, BC=16, groups=groups)
    forwards_agree(cgm_inputs(*shape, dtype, device="cpu", seed=29, channels_last=last), residual,
                   {"fwd": dict(gemm=dict(BP=16, BC=16))},
                   {"fwd": dict(gemm=dict(BP=16, BC=16, fuse_apply=True, apply=apply))})


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_channels_last_in_and_out(dtype):
    inputs = cgm_inputs(2, 18, 5, 6, DTYPES[dtype], device="cpu", seed=5, channels_last=True)
    check(inputs, DTYPES[dtype], False)
    y_ct, y_pet = vk.cgm_gate(**inputs, backend="triton")
    assert y_ct.is_contiguous(memory_format=torch.channels_last)
    assert y_pet.is_contiguous(memory_format=torch.channels_last)


def test_mixed_layouts_and_expanded_gradient():
    """x_ct channels-last, x_pet channels-first; y.sum() sends a stride-0 gradient."""
    inputs = cgm_inputs(2, 7, 4, 5, torch.float32, device="cpu", seed=7)
    inputs["x_ct"] = inputs["x_ct"].contiguous(memory_format=torch.channels_last)

    def total(backend):
        def fn(**kw):
            y_ct, y_pet = vk.cgm_gate(**kw, backend=backend)
            return (y_ct.sum() + 2 * y_pet.sum()).reshape(1)
        return fn
    out, grads = run_with_grads(total("triton"), inputs, torch.ones(1))
    ref64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    r64, g64 = run_with_grads(total("reference"), ref64, torch.ones(1, dtype=torch.float64))
    r32, g32 = run_with_grads(total("reference"), inputs, torch.ones(1))
    assert_close_by_rule("out", out, r64, r32)
    for k in g64:
        assert_close_by_rule(f"grad {k}", grads[k], g64[k], g32[k])


def test_only_one_output_used():
    """A graph that uses y_pet alone: c_ct and w_ct get zero gradients, the rest the right ones.
    (The reference would give None for those two; torch.library hands the op zeros for y_ct.)"""
    inputs = cgm_inputs(1, 4, 3, 3, torch.float32, device="cpu", seed=9)

    def pet_only(backend):
        def fn(**kw):
            y_ct, y_pet = vk.cgm_gate(**kw, backend=backend)
            return y_pet + 0 * y_ct.sum()
        return fn
    check_against_reference(pet_only("triton"), pet_only("reference"), inputs)
    y_pet = vk.cgm_gate(**{k: v.requires_grad_() for k, v in inputs.items()}, backend="triton")[1]
    y_pet.sum().backward()
    assert inputs["c_ct"].grad.abs().max() == 0 and inputs["w_ct"].grad.abs().max() == 0
    assert inputs["c_pet"].grad.abs().max() > 0


def test_registered_ops_path(monkeypatch):
    """Under torch.compile the entry goes through the registered ops (eager uses an autograd
    Function over the same launchers): that route by the rule too, output and every gradient."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    check(cgm_inputs(2, 5, 6, 7, torch.float32, device="cpu", seed=15), torch.float32, True)


def test_float64_runs_the_reference():
    inputs = cgm_inputs(1, 3, 4, 5, torch.float64, device="cpu")
    for a, b in zip(vk.cgm_gate(**inputs, backend="triton"), vk.cgm_gate(**inputs, backend="reference")):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_availability_and_refusal(monkeypatch):
    assert cgm_triton.availability() is None  # interpreter on CPU, or a GPU
    if ON_GPU:
        return
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in cgm_triton.availability()
    with pytest.raises(RuntimeError, match="triton"):
        vk.cgm_gate(**cgm_inputs(1, 3, 4, 5, torch.float32, device="cpu"), backend="triton")


BAD = {
    "x_pet shape": (dict(x_pet=torch.randn(2, 5, 6, 8)), ValueError, r"x_pet: expected shape \(2, 5, 6, 7\)"),
    "x_pet dtype": (dict(x_pet=torch.randn(2, 5, 6, 7, dtype=torch.float16)), TypeError, r"x_pet: expected dtype torch.float32"),
    "x_ct rank": (dict(x_ct=torch.randn(5, 6, 7)), ValueError, r"x_ct: expected a 4-D tensor, got 3-D"),
    "c_ct shape": (dict(c_ct=torch.rand(2, 4)), ValueError, r"c_ct: expected shape \(2, 5\)"),
    "w_pet shape": (dict(w_pet=torch.randn(1, 5, 3, 3)), ValueError, r"w_pet: expected shape \(1, 10, 3, 3\)"),
    "w_ct int": (dict(w_ct=torch.ones(1, 10, 3, 3, dtype=torch.int64)), TypeError, r"w_ct: expected a floating-point"),
    "empty plane": (dict(x_ct=torch.randn(2, 5, 0, 7), x_pet=torch.randn(2, 5, 0, 7)), ValueError, r"x_ct: expected every dimension >= 1"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises_with_message(case):
    changes, exc, msg = BAD[case]
    inputs = cgm_inputs(2, 5, 6, 7, torch.float32, device="cpu")
    inputs.update(changes)
    with pytest.raises(exc, match=msg):
        vk.cgm_gate(**inputs, backend="triton")


def _opcheck(device, dtype, shape):
    inputs = cgm_inputs(*shape, dtype, device=device, seed=11)
    args = tuple(v.requires_grad_() for v in inputs.values()) + (True,)
    torch.library.opcheck(torch.ops.vmambax.cgm_gate_triton_fwd.default, args)
    with torch.no_grad():
        s = torch.ops.vmambax.cgm_gate_triton_fwd(*args)[2]
    grads = tuple(torch.randn_like(v) for v in args[:2])
    bwd_args = grads + tuple(v.detach() for v in args[:6]) + (s, True)
    torch.library.opcheck(torch.ops.vmambax.cgm_gate_triton_bwd.default, bwd_args)


def test_opcheck_cpu():
    _opcheck("cpu", torch.float32, (1, 3, 3, 4))


def test_split_bf16_parts_are_exact():
    """The backward's 16-bit products rest on _split_bf16: three bfloat16 parts that sum to the
    fp32 input exactly, the second and third below 2**-7 and 2**-14 of it (what _mm_half16's
    bound on the terms it leaves out assumes), over random significands, both signs, zero and
    magnitudes from 2**-110 (its documented limit) to near fp32's largest."""
    import triton
    import triton.language as tl
    # by global name: Triton's interpreter runs the kernel without its closure
    globals()["_split_bf16"] = cgm_triton._kernels()["_split_bf16"]

    @triton.jit
    def parts(a_ptr, p_ptr, N: tl.constexpr, INTERP: tl.constexpr):
        i = tl.arange(0, N)
        p0, p1, p2 = _split_bf16(tl.load(a_ptr + i), INTERP)  # noqa: F821
        tl.store(p_ptr + i, p0.to(tl.float32))
        tl.store(p_ptr + N + i, p1.to(tl.float32))
        tl.store(p_ptr + 2 * N + i, p2.to(tl.float32))

    g = torch.Generator().manual_seed(31)
    n = 4096
    sig = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    exp = torch.randint(-110, 127, (n,), generator=g).to(torch.float64)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    a = (sign * sig * 2.0 ** exp).to(torch.float32)
    a[:4] = torch.tensor([0.0, 1.0, -2.0 ** -110, torch.finfo(torch.float32).max])
    p = torch.empty(3 * n, dtype=torch.float32, device=DEVICE)
    parts[(1,)](a.to(DEVICE), p, N=n, INTERP=cgm_triton.interpreting())
    p0, p1, p2 = p.cpu().double().view(3, n)
    for q in (p0, p1, p2):
        assert torch.equal(q.float().to(torch.bfloat16).double(), q), "a part is not a bfloat16 value"
    err = (p0 + p1 + p2 - a.double()).abs()
    assert err.max() == 0, f"parts miss the input by {err.max().item()} at {a[err.argmax()].item()}"
    for q, bound in ((p1, 2.0 ** -7), (p2, 2.0 ** -14)):
        assert ((q.abs() < bound * a.double().abs()) | (q == 0)).all()


# ---------------------------------------------------------------------------------------------
# GPU: the shape set of DESIGN.md (cgm1..cgm4) and a non-square plane, every dtype
# ---------------------------------------------------------------------------------------------
GPU_SHAPES = {"cgm1": (8, 96, 128, 128), "cgm2": (8, 192, 64, 64), "cgm3": (8, 384, 32, 32),
              "cgm4": (8, 768, 16, 16), "rect1": (8, 96, 128, 96)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_gpu_stage_shapes(shape, dtype, exact_cuda_refs):
    check(cgm_inputs(*GPU_SHAPES[shape], DTYPES[dtype], seed=1), DTYPES[dtype], True, device_ref="cuda")


# Every launch variant bench_cgm.py --sweep times (cgm_triton.VARIANTS) at the stage shapes, so that
# one GPU run says whether a variant the sweep found faster may become a default (the overrides
# apply to every dtype, fp32's separate defaults included).
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
@pytest.mark.parametrize("variant", list(cgm_triton.VARIANTS))
def test_gpu_variants_at_stage_shapes(variant, shape, dtype, exact_cuda_refs):
    cgm_triton.CONFIG_OVERRIDE.update(cgm_triton.VARIANTS[variant])
    try:
        check(cgm_inputs(*GPU_SHAPES[shape], DTYPES[dtype], seed=3), DTYPES[dtype], True, device_ref="cuda")
    finally:
        cgm_triton.CONFIG_OVERRIDE.clear()


# The fused forward variants against the three-launch GEMM forward with the same taps kernel: y and s
# bit for bit at the stage shapes. The fused kernel adds P's taps in the order the shift kernel's
# tl.sum compiles to (triton_gemm._tap_chain, read off its TTGIR and LLVM IR offline): this checks
# that on the device.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
@pytest.mark.parametrize("variant", [v for v, cfg in cgm_triton.VARIANTS.items()
                                     if isinstance(cfg.get("fwd", {}).get("gemm"), dict)
                                     and cfg["fwd"]["gemm"].get("fuse_apply")])
def test_gpu_fused_apply_matches_three_launches(variant, shape, dtype):
    fused = cgm_triton.VARIANTS[variant]
    base = {"fwd": dict(gemm={k: v for k, v in fused["fwd"]["gemm"].items() if k not in ("fuse_apply", "apply")})}
    forwards_agree(cgm_inputs(*GPU_SHAPES[shape], DTYPES[dtype], seed=5), True, base, fused)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_gpu_plain_variant_and_layouts(layout, exact_cuda_refs):
    inputs = cgm_inputs(4, 96, 40, 56, torch.bfloat16, seed=2, channels_last=layout == "channels_last")
    check(inputs, torch.bfloat16, False, device_ref="cuda")


@pytest.mark.gpu
def test_gpu_outputs_fully_written():
    """Poisoned caching-allocator memory must not leak through: NaN-filled blocks are reused."""
    inputs = cgm_inputs(2, 40, 33, 17, torch.float16, seed=4)
    torch.full((2 * 40 * 33 * 17 * 4,), float("nan"), device="cuda", dtype=torch.float16)  # freed
    y = vk.cgm_gate(**inputs, backend="triton")
    assert all(torch.isfinite(t).all() for t in y)


@pytest.mark.gpu
def test_gpu_opcheck():
    _opcheck("cuda", torch.bfloat16, (2, 24, 9, 13))
