"""Pure-PyTorch reference of the four-direction 2D selective scan: the spec (SPEC.md section 1).

Readable first: the four walks are explicit gathers, the recurrence is a Python loop over the
sequence vectorised over batch, direction, channel and state. Exact in float32/float64; autograd
provides every gradient. Every fast backend is tested against these functions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def availability() -> str | None:
    return None  # always runs


def walk_orders(H: int, W: int, device=None) -> torch.Tensor:
    """(4, H*W) int64: entry [k, t] is the position p = h*W + w visited at step t of walk k."""
    p = torch.arange(H * W, device=device)
    col = p.view(H, W).t().reshape(-1)
    return torch.stack([p, col, p.flip(0), col.flip(0)])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _to_walks(u, delta, A, B, C, D, delta_bias, delta_softplus):
    """The four walks' inputs: u_k, delta_k (after bias/softplus) (Bt, 4, Dm, L); B_k, C_k
    (Bt, 4, N, L); A, D in the compute dtype; and the walks (4, L)."""
    Bt, Dm, H, W = u.shape
    N, L = A.shape[-1], H * W
    ct = _compute_dtype(u)
    walks = walk_orders(H, W, u.device)                      # (4, L)

    def gather(x, rows):                                     # (Bt, 4|1, rows, H, W) -> (Bt, 4, rows, L)
        x = x.to(ct).reshape(Bt, -1, rows, L).expand(Bt, 4, rows, L)
        return torch.gather(x, 3, walks[None, :, None, :].expand(Bt, 4, rows, L))

    dl = delta.to(ct)
    if delta_bias is not None:
        dl = dl + delta_bias.to(ct)[None, :, :, None, None]
    if delta_softplus:
        dl = F.softplus(dl)
    D = None if D is None else D.to(ct)
    return gather(u[:, None], Dm), gather(dl, Dm), A.to(ct), gather(B, N), gather(C, N), D, walks


def _merge(y_k, u_k, D, walks, shape, out_dtype):
    """Add D*u, put each walk's outputs back at their positions, sum the four walks."""
    Bt, Dm, H, W = shape
    if D is not None:
        y_k = y_k + D[None, :, :, None] * u_k
    inverse = torch.argsort(walks, dim=1)
    y = torch.gather(y_k, 3, inverse[None, :, None, :].expand(Bt, 4, Dm, H * W)).sum(1)
    return y.reshape(Bt, Dm, H, W).to(out_dtype)


def selective_scan_2d(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True,
                      out_dtype=torch.float32):
    """Reference four-direction scan; shapes as the public op (SPEC.md section 1).

    u (Bt, Dm, H, W); delta (Bt, 4, Dm, H, W); A (4, Dm, N); B, C (Bt, 4, N, H, W);
    D, delta_bias (4, Dm) or None  ->  y (Bt, Dm, H, W) in out_dtype.
    State and sums in float32 (float64 when u is float64).
    """
    u_k, dl_k, A, B_k, C_k, D, walks = _to_walks(u, delta, A, B, C, D, delta_bias, delta_softplus)
    Bt, _, Dm, L = u_k.shape
    dA = torch.exp(dl_k[..., None] * A[None, :, :, None, :])                  # (Bt, 4, Dm, L, N)
    dBu = (dl_k * u_k)[..., None] * B_k.transpose(2, 3)[:, :, None]           # (Bt, 4, Dm, L, N)
    h = torch.zeros_like(dA[:, :, :, 0])
    hs = []
    # unbind, not dA[:, :, :, t]: each index's backward would allocate a full-size zero gradient.
    for dA_t, dBu_t in zip(dA.unbind(3), dBu.unbind(3)):
        h = dA_t * h + dBu_t
        hs.append(h)
    y_k = (torch.stack(hs, dim=3) * C_k.transpose(2, 3)[:, :, None]).sum(-1)  # (Bt, 4, Dm, L)
    return _merge(y_k, u_k, D, walks, u.shape, out_dtype)


class _LinearRecurrence(torch.autograd.Function):
    """y[..., t] = sum_n C[t, n] h_t[n] with h_t = a_t * h_{t-1} + b_t, h_{-1} = 0, and its
    backward as an explicit reverse scan (dh_t = C_t g_t + a_{t+1} dh_{t+1}): one cheap op per
    step each way, where autograd through the loop costs a graph node per step and op.

    a, b: (Bt, 4, Dm, L, N); C: (Bt, 4, N, L) -> y (Bt, 4, Dm, L).
    """

    @staticmethod
    def forward(ctx, a, b, C):
        a_s, b_s = a.permute(3, 0, 1, 2, 4).contiguous(), b.permute(3, 0, 1, 2, 4).contiguous()  # (L, Bt, 4, Dm, N)
        hs = torch.empty_like(a_s)
        hs[0].copy_(b_s[0])
        for t in range(1, a_s.shape[0]):
            torch.addcmul(b_s[t], a_s[t], hs[t - 1], out=hs[t])
        ctx.save_for_backward(a_s, hs, C)
        return torch.einsum("lbkdn,bknl->bkdl", hs, C)

    @staticmethod
    def backward(ctx, gy):
        a_s, hs, C = ctx.saved_tensors
        dhs = torch.einsum("bkdl,bknl->lbkdn", gy, C).contiguous()       # C_t g_t, then the reverse scan in place
        for t in range(a_s.shape[0] - 2, -1, -1):
            dhs[t].addcmul_(a_s[t + 1], dhs[t + 1])
        ga = torch.zeros_like(dhs)
        ga[1:] = dhs[1:] * hs[:-1]                                        # d h_t / d a_t = h_{t-1}
        gC = torch.einsum("lbkdn,bkdl->bknl", hs, gy)
        to_bkdln = (1, 2, 3, 0, 4)
        return ga.permute(*to_bkdln), dhs.permute(*to_bkdln), gC


def selective_scan_2d_fast(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True,
                           out_dtype=torch.float32):
    """``selective_scan_2d`` with the recurrence in ``_LinearRecurrence``: same values (tested
    against the spec), several times faster to differentiate on a CPU. Backs the reference op."""
    u_k, dl_k, A, B_k, C_k, D, walks = _to_walks(u, delta, A, B, C, D, delta_bias, delta_softplus)
    dA = torch.exp(dl_k[..., None] * A[None, :, :, None, :])                  # (Bt, 4, Dm, L, N)
    dBu = (dl_k * u_k)[..., None] * B_k.transpose(2, 3)[:, :, None]           # (Bt, 4, Dm, L, N)
    y_k = _LinearRecurrence.apply(dA, dBu, C_k)                               # (Bt, 4, Dm, L)
    return _merge(y_k, u_k, D, walks, u.shape, out_dtype)


def lowrank_delta(dt, dt_projs_weight):
    """delta[b, k, d, h, w] = sum_r dt_projs_weight[k, d, r] * dt[b, k, r, h, w]."""
    return torch.einsum("bkrhw,kdr->bkdhw", dt, dt_projs_weight.to(dt.dtype))


def selective_scan_2d_lowrank(u, dt, dt_projs_weight, A, B, C, D=None, delta_bias=None,
                              delta_softplus=True, out_dtype=torch.float32):
    """Scan with the low-rank delta (what the fast backends fuse): dt (Bt, 4, R, H, W),
    dt_projs_weight (4, Dm, R); the rest as ``selective_scan_2d``. delta is formed in the
    compute dtype (fp32/fp64), as the fast kernels do it."""
    ct = _compute_dtype(u)
    delta = lowrank_delta(dt.to(ct), dt_projs_weight.to(ct))
    return selective_scan_2d(u.to(ct), delta, A, B.to(ct), C.to(ct), D, delta_bias, delta_softplus, out_dtype)


def project(x, x_proj_weight, R: int, N: int):
    """VMamba's x_proj per position, in the 2D layout: (dt, B, C) each (Bt, 4, R|N|N, H, W)."""
    x_dbl = torch.einsum("bdhw,kcd->bkchw", x, x_proj_weight.to(x.dtype))
    return torch.split(x_dbl, [R, N, N], dim=2)
