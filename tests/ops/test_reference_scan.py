"""The reference scan is the spec: check it against SPEC.md's definition written out naively."""
import pytest
import torch
import torch.nn.functional as F

import vmambax_kernels as vk
from vmambax_kernels.selective_scan import reference
from vmambax_kernels.testing import CPU_SHAPES, ScanCase, cast, scan_inputs


def naive_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """SPEC.md section 1 literally: four explicit scanned copies, a loop per direction, a merge."""
    Bt, Dm, H, W = u.shape
    N = A.shape[-1]

    def cross_scan(x):                       # (Bt, ..., H, W) -> list of 4 sequences (Bt, ..., L)
        row = x.flatten(-2)
        col = x.transpose(-1, -2).flatten(-2)
        return [row, col, row.flip(-1), col.flip(-1)]

    def uncross(seq, k):                     # a sequence of walk k back to (Bt, Dm, H, W)
        if k >= 2:
            seq = seq.flip(-1)
        if k % 2 == 0:
            return seq.unflatten(-1, (H, W))
        return seq.unflatten(-1, (W, H)).transpose(-1, -2)

    us = cross_scan(u)
    y = torch.zeros(Bt, Dm, H, W, dtype=u.dtype)
    for k in range(4):
        dl = delta[:, k] + (delta_bias[k][None, :, None, None] if delta_bias is not None else 0)
        dl = F.softplus(dl) if delta_softplus else dl
        dls, Bs, Cs = cross_scan(dl)[k], cross_scan(B[:, k])[k], cross_scan(C[:, k])[k]
        h = torch.zeros(Bt, Dm, N, dtype=u.dtype)
        outs = []
        for t in range(H * W):
            d_t = dls[:, :, t]                                           # (Bt, Dm)
            h = torch.exp(d_t[..., None] * A[k]) * h + (d_t * us[k][:, :, t])[..., None] * Bs[:, None, :, t]
            y_t = (h * Cs[:, None, :, t]).sum(-1)
            if D is not None:
                y_t = y_t + D[k] * us[k][:, :, t]
            outs.append(y_t)
        y = y + uncross(torch.stack(outs, -1), k)
    return y


def assert_same_values_and_grads(fn, ref_fn, inputs, out_tol, grad_rtol, grad_atol):
    """fn and ref_fn give the same output and the same gradient of every input, float64."""
    a = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    b = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, y_ref = fn(**a), ref_fn(**b)
    torch.testing.assert_close(y, y_ref, rtol=out_tol, atol=out_tol)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    for k in a:
        torch.testing.assert_close(a[k].grad, b[k].grad, rtol=grad_rtol, atol=grad_atol, msg=f"grad {k}")


def test_walk_orders_literal():
    # SPEC.md's example: H = 2, W = 3.
    assert reference.walk_orders(2, 3).tolist() == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5],
                                                    [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]


def test_each_walk_visits_positions_in_spec_order():
    # A single-state scan with A = 0 and unit delta counts the positions seen so far: walk k's
    # output at p is (1 + steps before p in walk k) * u (C = B = 1). Check each walk alone.
    H, W = 2, 3
    u = torch.ones(1, 1, H, W, dtype=torch.float64)
    order = [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]
    for k in range(4):
        B = torch.zeros(1, 4, 1, H, W, dtype=torch.float64)
        B[:, k] = 1
        y = vk.selective_scan_2d(u, torch.ones(1, 4, 1, H, W, dtype=torch.float64),
                                 torch.zeros(4, 1, 1, dtype=torch.float64), B, torch.ones_like(B),
                                 delta_softplus=False, out_dtype=torch.float64, backend="reference")
        expected = torch.empty(H * W, dtype=torch.float64)
        expected[torch.tensor(order[k])] = torch.arange(1, H * W + 1, dtype=torch.float64)
        torch.testing.assert_close(y.flatten(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CPU_SHAPES.values()), ids=list(CPU_SHAPES))
@pytest.mark.parametrize("with_D", [True, False])
def test_reference_matches_naive_forward_and_grads(case, with_D):
    inputs = cast(scan_inputs(case, torch.float64, with_D=with_D, with_bias=with_D, Bt=min(case.Bt, 3)), torch.float64)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    assert_same_values_and_grads(
        lambda **kw: vk.selective_scan_2d(**kw, out_dtype=torch.float64, backend="reference"), naive_scan, inputs,
        out_tol=1e-12, grad_rtol=1e-10, grad_atol=1e-12)


GRADCHECK_CASES = [ScanCase("h1", 2, 2, 1, 5, 3), ScanCase("w1", 1, 2, 4, 1, 2), ScanCase("prime", 1, 1, 3, 5, 1),
                   ScanCase("n64", 1, 1, 2, 3, 64), ScanCase("hw11", 1, 1, 1, 1, 2)]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c.name for c in GRADCHECK_CASES])
def test_gradcheck_float64(case):
    inputs = cast(scan_inputs(case, torch.float64), torch.float64)
    names = list(inputs)
    args = tuple(inputs[n].requires_grad_() for n in names)

    def fn(*a):
        return vk.selective_scan_2d(**dict(zip(names, a)), out_dtype=torch.float64, backend="reference")

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


def test_lowrank_and_module_form_agree_with_explicit_delta():
    case = CPU_SHAPES["enc_tiny"]
    x = torch.randn(2, case.Dm, case.H, case.W, dtype=torch.float64)
    N, R, Dm = case.N, case.R, case.Dm
    xw = torch.randn(4, R + 2 * N, Dm, dtype=torch.float64) / Dm ** 0.5
    dtw = torch.randn(4, Dm, R, dtype=torch.float64) / R ** 0.5
    bias = torch.randn(4, Dm, dtype=torch.float64) - 3
    A_logs = torch.rand(4 * Dm, N, dtype=torch.float64)
    Ds = torch.randn(4 * Dm, dtype=torch.float64)
    y = vk.cross_selective_scan_2d(x, xw, dtw, bias, A_logs, Ds, backend="reference")
    x_dbl = torch.einsum("bdhw,kcd->bkchw", x, xw)
    dt, B, C = x_dbl.split([R, N, N], dim=2)
    delta = torch.einsum("bkrhw,kdr->bkdhw", dt, dtw)
    y_naive = naive_scan(x, delta, -torch.exp(A_logs).view(4, Dm, N), B, C, Ds.view(4, Dm), bias)
    torch.testing.assert_close(y.double(), y_naive, rtol=1e-12, atol=1e-12)
    assert y.dtype == torch.float64  # fp64 in, fp64 out: keeps the module form exact for gradcheck


def test_bf16_inputs_give_fp32_output_close_to_fp64():
    case = CPU_SHAPES["dec_tiny"]
    inputs = scan_inputs(case, torch.bfloat16)
    y = vk.selective_scan_2d(**inputs, backend="reference")
    y64 = vk.selective_scan_2d(**cast(inputs, torch.float64), out_dtype=torch.float64, backend="reference")
    assert y.dtype == torch.float32
    # Same rounded inputs, fp32 state: only fp32 arithmetic separates the two.
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CPU_SHAPES.values())[:4], ids=list(CPU_SHAPES)[:4])
def test_fast_reference_equals_the_spec_loop(case):
    # The reference op runs selective_scan_2d_fast (explicit reverse scan); the spec is the plain loop.
    inputs = cast(scan_inputs(case, torch.float64, Bt=min(case.Bt, 3)), torch.float64)
    assert_same_values_and_grads(
        lambda **kw: reference.selective_scan_2d_fast(**kw, out_dtype=torch.float64),
        lambda **kw: reference.selective_scan_2d(**kw, out_dtype=torch.float64), inputs,
        out_tol=1e-13, grad_rtol=1e-11, grad_atol=1e-13)
