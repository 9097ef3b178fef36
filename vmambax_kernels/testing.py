"""Test and benchmark helpers: the shape set of DESIGN.md, input makers, the tolerance rule.

The rule (STYLE.md): inputs are rounded to the tested dtype first so every implementation sees the
same values; ``ref64`` is the reference in float64 and ``ref32`` in float32 on those values; a fast
result passes when, for the output and every gradient,
``max|out - ref64| <= 2 * max|ref32 - ref64| + 1e-6 * max|ref64|`` (+ the output's own rounding
when it is stored in a 16-bit dtype).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The op tests' dtype names (test ids) and device: the GPU when there is one, else the CPU (Triton
# under its interpreter, which tests/conftest.py selects before anything imports Triton).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ON_GPU = torch.cuda.is_available()
TEST_DEVICE = "cuda" if ON_GPU else "cpu"


@dataclass(frozen=True)
class ScanCase:
    name: str
    Bt: int        # planes
    d_model: int
    H: int
    W: int
    N: int

    @property
    def Dm(self) -> int:
        return 2 * self.d_model

    @property
    def R(self) -> int:
        return math.ceil(self.d_model / 16)


def _stages(prefix, batches, dmodels, sizes, N):
    return [ScanCase(f"{prefix}{i + 1}", b, d, s[0], s[1], N)
            for i, (b, d, s) in enumerate(zip(batches, dmodels, sizes))]


_DM = (96, 192, 384, 768)
# The shape set of DESIGN.md (the 512x512 model, batch 8).
SHAPES: dict[str, ScanCase] = {c.name: c for c in (
    _stages("enc", [8] * 4, _DM, [(128, 128), (64, 64), (32, 32), (16, 16)], 16)
    + _stages("dcim_outer", [8] * 4, _DM, [(32, 32), (16, 16), (8, 8), (4, 4)], 16)
    + _stages("dcim_inner", [8192, 2048, 512, 128], _DM, [(4, 4)] * 4, 16)
    + _stages("dec", [8] * 3, (384, 192, 96), [(32, 32), (64, 64), (128, 128)], 4)
    + [ScanCase("rect1", 8, 96, 128, 96, 16), ScanCase("odd", 3, 20, 37, 53, 7)]
)}

# Tiny CPU set: one case per category, H != W, H = 1, W = 1, N = 1, channels not a multiple of a
# block, several planes per block.
CPU_SHAPES: dict[str, ScanCase] = {c.name: c for c in (
    ScanCase("enc_tiny", 2, 12, 6, 5, 16),
    ScanCase("dcim_inner_tiny", 37, 6, 4, 4, 16),
    ScanCase("dec_tiny", 1, 10, 5, 7, 4),
    ScanCase("row", 2, 5, 1, 9, 3),
    ScanCase("col", 2, 5, 8, 1, 2),
    ScanCase("n1", 3, 3, 3, 4, 1),
    ScanCase("odd_tiny", 1, 20, 7, 3, 7),
    ScanCase("dot", 6, 5, 1, 1, 4),  # L = 1: DCIM's outer map of a 4x4 stage; grad A is exactly 0
)}


def scan_inputs(case: ScanCase, dtype=torch.float32, device="cpu", seed=0, lowrank=False,
                with_D=True, with_bias=True, Bt=None) -> dict:
    """Inputs of ``selective_scan_2d`` (or of the low-rank form when ``lowrank``), at realistic
    magnitudes (softplus(delta + bias) around 1e-3..1e-1 as VMamba's init gives), already rounded to
    ``dtype``; parameters float32. Returns a dict of keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    Bt = Bt or case.Bt
    Dm, H, W, N, R = case.Dm, case.H, case.W, case.N, case.R

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    A_log = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(4, Dm, N)
    A = -torch.exp(A_log + 0.1 * torch.rand(4, Dm, N, generator=g))
    dt_init = torch.exp(torch.rand(4, Dm, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    out = dict(u=rnd(Bt, Dm, H, W), A=A.to(device))
    if lowrank:
        out["dt"] = rnd(Bt, 4, R, H, W)
        out["dt_projs_weight"] = ((torch.rand(4, Dm, R, generator=g) * 2 - 1) * R ** -0.5).to(device)
    else:
        out["delta"] = rnd(Bt, 4, Dm, H, W, scale=0.5)
    out["B"], out["C"] = rnd(Bt, 4, N, H, W), rnd(Bt, 4, N, H, W)
    out["D"] = (1 + 0.1 * torch.randn(4, Dm, generator=g)).to(device) if with_D else None
    out["delta_bias"] = (dt_init + torch.log(-torch.expm1(-dt_init))).to(device) if with_bias else None
    return out


def cast(inputs: dict, dtype, device=None) -> dict:
    """Copy every tensor of ``inputs`` to ``dtype`` (values unchanged when widening)."""
    return {k: (v.to(device=device or v.device, dtype=dtype) if isinstance(v, torch.Tensor)
                and v.is_floating_point() else v)
            for k, v in inputs.items()}


def rounding_of(dtype) -> float:
    """Relative rounding error of storing a value in ``dtype`` (half an ulp)."""
    return {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}.get(dtype, 0.0)


def tolerance(ref64: torch.Tensor, ref32: torch.Tensor, out_dtype=torch.float32) -> float:
    """The allowed max abs error of a fast result against ref64 (the rule above)."""
    ref64 = ref64.double()
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    base = 2 * (ref32.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    return base + 1e-6 * scale + rounding_of(out_dtype) * scale


def assert_close_by_rule(name: str, out: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor,
                         out_dtype=None) -> None:
    """Raise AssertionError with max/mean error and where, when ``out`` breaks the rule."""
    if out is None or ref64 is None:
        if (out is None) != (ref64 is None):
            raise AssertionError(f"{name}: one of out/ref is None (out={out is None}, ref={ref64 is None})")
        return
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    out_dtype = out_dtype or out.dtype
    err = (out.double().cpu() - ref64.double().cpu()).abs()
    tol = tolerance(ref64.cpu(), ref32.cpu(), out_dtype)
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: {(~torch.isfinite(out)).sum().item()} non-finite values")
    if err.numel() and err.max().item() > tol:
        where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name}: max|out-ref64| = {err.max().item():.3e} at {where} > tol {tol:.3e} "
            f"(mean {err.mean().item():.3e}, max|ref32-ref64| = "
            f"{(ref32.double().cpu() - ref64.double().cpu()).abs().max().item():.3e}, "
            f"max|ref64| = {ref64.abs().max().item():.3e})")


class RoundGrad(torch.autograd.Function):
    """Identity whose backward rounds the incoming gradient to ``dtype``: autograd does that to
    the gradient of a 16-bit output, so the float64/float32 references must see the same values."""

    @staticmethod
    def forward(ctx, y, dtype):
        ctx.dtype = dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).to(g.dtype), None


def run_with_grads(fn, inputs: dict, grad_out: torch.Tensor | None = None, seed: int = 1):
    """Run ``fn(**inputs)`` on fresh leaf copies, backprop ``grad_out`` (a fixed random tensor when
    None); return (out, {name: grad}) with every float tensor input's gradient."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor)
                  and v.is_floating_point() else v) for k, v in inputs.items()}
    out = fn(**leaves)
    if grad_out is None:
        g = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(out.shape, generator=g).to(out)
    out.backward(grad_out.to(out))
    return out.detach(), {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def assert_model_close_by_rule(fast, ref32, ref64) -> None:
    """A whole model's runs, each (logits, {parameter name: gradient}): the fast run against the
    reference run in float64 and float32 by the rule; every gradient that breaks it is reported."""
    (out, grads), (r32, g32), (r64, g64) = fast, ref32, ref64
    assert grads.keys() == g64.keys(), f"gradients of {sorted(set(grads) ^ set(g64))} on one side only"
    assert_close_by_rule("logits", out, r64, r32)
    failures = []
    for n in g64:
        try:
            assert_close_by_rule(f"grad {n}", grads[n], g64[n], g32[n])
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {len(g64)} gradients break the rule:\n" + "\n".join(failures)


def check_against_reference(fast_fn, ref_fn, inputs: dict, out_dtype=torch.float32, device_ref="cpu"):
    """The full rule for the output and every gradient: ``fast_fn`` on ``inputs`` against
    ``ref_fn`` in float64 and float32 on the same (already rounded) values."""
    out, grads = run_with_grads(fast_fn, inputs)          # grad_out: randn(out.shape), seed 1
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    r64, g64 = run_with_grads(ref_fn, cast(inputs, torch.float64, device_ref), grad_out.double())
    r32, g32 = run_with_grads(ref_fn, cast(inputs, torch.float32, device_ref), grad_out.float())
    assert_close_by_rule("out", out, r64, r32, out_dtype)
    for k in g64:
        assert_close_by_rule(f"grad {k}", grads.get(k), g64[k], g32[k], inputs[k].dtype)
