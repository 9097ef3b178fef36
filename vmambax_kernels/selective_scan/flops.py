"""FLOP formulas of the scan ops for torch.utils.flop_counter (one place for every backend).

fvcore's convention, which the published figures use, counts one multiply-add as one and the
selective scan as 9*B*L*D*N (+ B*D*L with D), where D = 4*Dm for the four directions.
flop_counter counts a multiply-add as two FLOPs, so formulas here return twice that.
"""
from __future__ import annotations

from torch.utils.flop_counter import register_flop_formula


def scan_macs(Bt: int, Dm: int, L: int, N: int, with_D: bool = True, R: int = 0) -> int:
    """Multiply-adds (fvcore convention) of a four-direction scan; R > 0 adds the fused
    low-rank delta projection (dt_projs_weight @ dt, Bt*4*Dm*R*L)."""
    d = 4 * Dm
    return 9 * Bt * L * d * N + (Bt * d * L if with_D else 0) + Bt * d * R * L


def register_scan_flops(op, lowrank: bool = False) -> None:
    """Register the formula for a forward scan op (an OpOverloadPacket, torch.ops.vmambax.x) whose first args are (u, delta_or_dt, A, B, C, D)."""

    @register_flop_formula(op)
    def _formula(u_shape, dl_shape, A_shape, B_shape, C_shape, D_shape=None, *args, **kwargs):
        Bt, Dm, H, W = u_shape
        R = dl_shape[2] if lowrank else 0
        return 2 * scan_macs(Bt, Dm, H * W, A_shape[-1], D_shape is not None, R)
