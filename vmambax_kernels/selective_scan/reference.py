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


def selective_scan_2d(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True,
                      out_dtype=torch.float32):
    """Reference four-direction scan; shapes as the public op (SPEC.md section 1).

    u (Bt, Dm, H, W); delta (Bt, 4, Dm, H, W); A (4, Dm, N); B, C (Bt, 4, N, H, W);
    D, delta_bias (4, Dm) or None  ->  y (Bt, Dm, H, W) in out_dtype.
    State and sums in float32 (float64 when u is float64).
    """
    Bt, Dm, H, W = u.shape
    N, L = A.shape[-1], H * W
    ct = _compute_dtype(u)
    walks = walk_orders(H, W, u.device)                      # (4, L)

    def to_walks(x, rows):                                   # (Bt, 4|1, rows, H, W) -> (Bt, 4, rows, L)
        x = x.to(ct).reshape(Bt, -1, rows, L).expand(Bt, 4, rows, L)
        return torch.gather(x, 3, walks[None, :, None, :].expand(Bt, 4, rows, L))

    u_k = to_walks(u[:, None], Dm)                           # (Bt, 4, Dm, L)
    dl = delta.to(ct)
    if delta_bias is not None:
        dl = dl + delta_bias.to(ct)[None, :, :, None, None]
    if delta_softplus:
        dl = F.softplus(dl)
    dl_k = to_walks(dl, Dm)                                  # (Bt, 4, Dm, L)
    B_k, C_k = to_walks(B, N), to_walks(C, N)                # (Bt, 4, N, L)

    # Step-major layout so the loop below indexes contiguous slices.
    dA = torch.exp(dl_k[..., None] * A.to(ct)[None, :, :, None, :])          # (Bt, 4, Dm, L, N)
    dBu = (dl_k * u_k)[..., None] * B_k.transpose(2, 3)[:, :, None]           # (Bt, 4, Dm, L, N)
    dA, dBu = dA.permute(3, 0, 1, 2, 4), dBu.permute(3, 0, 1, 2, 4)          # (L, Bt, 4, Dm, N)
    h = torch.zeros(Bt, 4, Dm, N, dtype=ct, device=u.device)
    hs = []
    # unbind, not dA[t]: each index's backward would allocate a full-size zero gradient (O(L^2)).
    for dA_t, dBu_t in zip(dA.unbind(0), dBu.unbind(0)):
        h = dA_t * h + dBu_t
        hs.append(h)
    hs = torch.stack(hs, dim=3)                                               # (Bt, 4, Dm, L, N)
    y_k = (hs * C_k.transpose(2, 3)[:, :, None]).sum(-1)                      # (Bt, 4, Dm, L)
    if D is not None:
        y_k = y_k + D.to(ct)[None, :, :, None] * u_k

    # Cross-merge: put each walk's outputs back at their positions, then sum the four.
    inverse = torch.argsort(walks, dim=1)
    y = torch.gather(y_k, 3, inverse[None, :, None, :].expand(Bt, 4, Dm, L)).sum(1)
    return y.reshape(Bt, Dm, H, W).to(out_dtype)


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
