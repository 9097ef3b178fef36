"""Triton backend of the norm-gate: out = LayerNorm_Dm(y channels last) * silu(z), one kernel each way;
the same kernels without the gate are the plain LayerNorm of ``vmambax_kernels.layer_norm``.

Notation: q a position (b, p) with p = h * W + w over the Bt * H * W positions, c a channel.
A program owns a tile of BP positions and walks their Dm channels in chunks of BD:

  forward:  pass 1 reads y[b, c, p] (a [BD, BP] tile per chunk, coalesced along positions) and
            merges each chunk's mean and sum of squared deviations into the running ones (Chan's
            parallel update, so no E[y^2] - E[y]^2 cancellation); pass 2 reads the chunk again
            (L1/L2-hot), normalises it, transposes it in registers to [BP, BD] and writes
            out[q, c] = (xhat w + b) silu(z) (z and out coalesced along channels), multiplied in
            fp32 and rounded once to z's dtype. Saves mean and rstd per position (fp32).
  backward: pass 1 recomputes xhat from y, mean, rstd and, from the output gradient g and z,
            writes dz = g n silu'(z) and sums per position s1 = sum_c dxhat and
            s2 = sum_c dxhat xhat (dxhat = g silu(z) w) and per channel dw += g silu(z) xhat,
            db += g silu(z); pass 2 reads the chunk again and writes
            dy = rstd (dxhat - (s1 + xhat s2) / Dm), transposed back to channels first.
            Programs loop over tiles; dw/db are per-program partial sums (registers when one
            chunk covers Dm, else read-modify-write of the program's own row, L2-hot), summed on
            the host after the launch.

Without the gate (GATE false: layer_norm's entry points) z is not read and dz not written: the
output is xhat w + b and dn = g. Every tensor is addressed as (plane b, position p, channel c) with
its own three strides, so y may be channels first (the scan's output) or channels last (layer_norm's
input), and the statistics' code is the same for both ops.

When the whole (power-of-two padded) channel row fits one chunk (ONE), it is read once and kept in
registers instead of being read twice. Tiles lie within one plane when BP divides H * W (EVEN):
their positions are then contiguous and the loads vectorise; otherwise each position finds its
plane by a division (odd plane sizes, planes smaller than a tile).

Runs on CUDA GPUs, or on CPU tensors under TRITON_INTERPRET=1 (tests). Kernels are defined on the
first launch, because Triton picks compiling or interpreting when a kernel is defined.
"""
from __future__ import annotations

import torch

from .._triton_env import availability, interpreting  # noqa: F401  (backend API)
from .._triton_math import jit_module

from . import reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------------------------------
# Kernels (plain functions here; _kernels() turns them into Triton functions on first use)
# ----------------------------------------------------------------------------------------------
# triton.language and its constexpr, bound by _kernels(): importing Triton waits for the first launch
tl = constexpr = None



def _load_y(y_row, sy_c, cc, mc, ok):
    """y[b, c, p] of the chunk's channels cc as a [BD, BP] fp32 tile (zero outside)."""
    return tl.load(y_row[None, :] + cc[:, None] * sy_c, mask=mc[:, None] & ok[None, :], other=0.0).to(tl.float32)


def _load_q(row, s_c, cc, mc, ok):
    """A channels-last tensor's [BP, BD] tile in fp32 (zero outside)."""
    return tl.load(row[:, None] + cc[None, :] * s_c, mask=ok[:, None] & mc[None, :], other=0.0).to(tl.float32)


def _fwd_chunk(yv, mean, rstd, z_row, o_row, w_ptr, b_ptr, out_ptr, sz_c, so_c, cc, mc, ok,
               GATE: constexpr, INTERP: constexpr):
    xh = tl.trans((yv - mean[None, :]) * rstd[None, :])                  # [BP, BD]
    w = tl.load(w_ptr + cc, mask=mc, other=0.0).to(tl.float32)
    bb = tl.load(b_ptr + cc, mask=mc, other=0.0).to(tl.float32)
    if GATE:
        z = _load_q(z_row, sz_c, cc, mc, ok)
        out = (xh * w[None, :] + bb[None, :]) * (z * _sigmoid(z, INTERP))
    else:
        out = xh * w[None, :] + bb[None, :]
    out = _round_bf16(out, out_ptr, INTERP)
    tl.store(o_row[:, None] + cc[None, :] * so_c, out.to(out_ptr.dtype.element_ty),
             mask=ok[:, None] & mc[None, :])


def _fwd(y_ptr, z_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, Dm, L, NQ, eps,
         sy_b, sy_c, sy_p, sz_b, sz_p, sz_c, so_b, so_p, so_c,
         GATE: constexpr, EVEN: constexpr, ONE: constexpr, INTERP: constexpr, BD: constexpr, BP: constexpr):
    """The forward of one tile of positions (module docstring); without GATE, z is not read."""
    b, p, ok = _tile(tl.program_id(0), L, NQ, BP, EVEN)
    y_row = y_ptr + b * sy_b + p * sy_p
    z_row = z_ptr + b * sz_b + p * sz_p
    o_row = out_ptr + b * so_b + p * so_p
    ch = tl.arange(0, BD)
    dm = Dm * 1.0   # divisions are tl.div_rn: Triton's `/` is div.full.f32 (2 ulp), PyTorch's rounds
    if ONE:
        mc = ch < Dm
        yv = _load_y(y_row, sy_c, ch, mc, ok)
        mean = tl.div_rn(tl.sum(yv, axis=0), dm)
        d = tl.where(mc[:, None], yv - mean[None, :], 0.0)
        var = tl.div_rn(tl.sum(d * d, axis=0), dm)
    else:
        mean = tl.zeros((BP,), dtype=tl.float32)
        m2 = tl.zeros((BP,), dtype=tl.float32)
        for c0 in range(0, Dm, BD):
            cc = c0 + ch
            mc = cc < Dm
            yv = _load_y(y_row, sy_c, cc, mc, ok)
            nb = tl.minimum(Dm - c0, BD).to(tl.float32)
            mean_b = tl.div_rn(tl.sum(yv, axis=0), nb)
            d = tl.where(mc[:, None], yv - mean_b[None, :], 0.0)
            # Chan et al.: merge (c0, mean, m2) with this chunk's (nb, mean_b, sum d^2)
            na = c0 * 1.0
            delta = mean_b - mean
            mean += delta * tl.div_rn(nb, na + nb)
            m2 += tl.sum(d * d, axis=0) + delta * delta * tl.div_rn(na * nb, na + nb)
        var = tl.div_rn(m2, dm)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    tl.store(mean_ptr + b * L + p, mean, mask=ok)
    tl.store(rstd_ptr + b * L + p, rstd, mask=ok)
    if ONE:
        _fwd_chunk(yv, mean, rstd, z_row, o_row, w_ptr, b_ptr, out_ptr, sz_c, so_c, ch, mc, ok, GATE,
                   INTERP)
    else:
        for c0 in range(0, Dm, BD):
            cc = c0 + ch
            mc = cc < Dm
            yv = _load_y(y_row, sy_c, cc, mc, ok)
            _fwd_chunk(yv, mean, rstd, z_row, o_row, w_ptr, b_ptr, out_ptr, sz_c, so_c, cc, mc, ok, GATE,
                       INTERP)


def _bwd_terms(y_row, g_row, z_row, mean, rstd, w_ptr, b_ptr, sy_c, sg_c, sz_c, cc, mc, ok,
               GATE: constexpr, INTERP: constexpr):
    """The chunk's xhat, dxhat = g silu(z) w, dn = g silu(z) and dz, each [BP, BD] fp32 (without
    GATE: dn = g, and no dz)."""
    xh = tl.trans((_load_y(y_row, sy_c, cc, mc, ok) - mean[None, :]) * rstd[None, :])
    w = tl.load(w_ptr + cc, mask=mc, other=0.0).to(tl.float32)
    g = _load_q(g_row, sg_c, cc, mc, ok)
    if GATE:
        bb = tl.load(b_ptr + cc, mask=mc, other=0.0).to(tl.float32)
        z = _load_q(z_row, sz_c, cc, mc, ok)
        sg = _sigmoid(z, INTERP)
        dn = g * (z * sg)
        dz = g * (xh * w[None, :] + bb[None, :]) * (sg * (1.0 + z * (1.0 - sg)))
    else:
        dn = g
        dz = g   # unused
    return xh, dn * w[None, :], dn, dz


def _bwd_pass1(y_row, g_row, z_row, dz_row, mean, rstd, w_ptr, b_ptr, dz_ptr,
               sy_c, sg_c, sz_c, sdz_c, cc, mc, ok, GATE: constexpr, INTERP: constexpr):
    """Writes the chunk's dz (GATE); returns xhat, dxhat and the chunk's parts of s1, s2, dw, db."""
    xh, dxh, dn, dz = _bwd_terms(y_row, g_row, z_row, mean, rstd, w_ptr, b_ptr, sy_c, sg_c, sz_c, cc, mc, ok,
                                 GATE, INTERP)
    if GATE:
        dz = _round_bf16(dz, dz_ptr, INTERP)
        tl.store(dz_row[:, None] + cc[None, :] * sdz_c, dz.to(dz_ptr.dtype.element_ty),
                 mask=ok[:, None] & mc[None, :])
    return (xh, dxh, tl.sum(dxh, axis=1), tl.sum(dxh * xh, axis=1),
            tl.sum(dn * xh, axis=0), tl.sum(dn, axis=0))


def _store_dy(xh, dxh, s1, s2, rstd, dy_row, dy_ptr, sdy_c, Dm, cc, mc, ok, INTERP: constexpr):
    # times 1/Dm rounded once, as PyTorch's LayerNorm backward
    dy = rstd[:, None] * (dxh - (s1[:, None] + xh * s2[:, None]) * tl.div_rn(1.0, Dm * 1.0))  # [BP, BD]
    dy = _round_bf16(tl.trans(dy), dy_ptr, INTERP)                         # [BD, BP]
    tl.store(dy_row[None, :] + cc[:, None] * sdy_c, dy.to(dy_ptr.dtype.element_ty),
             mask=mc[:, None] & ok[None, :])


def _bwd(g_ptr, y_ptr, z_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dy_ptr, dz_ptr, dw_ptr, db_ptr,
         Dm, L, NQ, n_tiles, sg_b, sg_p, sg_c, sy_b, sy_c, sy_p, sz_b, sz_p, sz_c,
         sdy_b, sdy_c, sdy_p, sdz_b, sdz_p, sdz_c,
         GATE: constexpr, EVEN: constexpr, ONE: constexpr, INTERP: constexpr, BD: constexpr, BP: constexpr):
    """The backward's persistent program (module docstring); without GATE, z, b and dz are not used."""
    pid = tl.program_id(0)
    ch = tl.arange(0, BD)
    dw_acc = tl.zeros((BD,), dtype=tl.float32)   # ONE: this program's partial sums
    db_acc = tl.zeros((BD,), dtype=tl.float32)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        b, p, ok = _tile(t, L, NQ, BP, EVEN)
        y_row = y_ptr + b * sy_b + p * sy_p
        g_row = g_ptr + b * sg_b + p * sg_p
        z_row = z_ptr + b * sz_b + p * sz_p
        dz_row = dz_ptr + b * sdz_b + p * sdz_p
        dy_row = dy_ptr + b * sdy_b + p * sdy_p
        mean = tl.load(mean_ptr + b * L + p, mask=ok, other=0.0)
        rstd = tl.load(rstd_ptr + b * L + p, mask=ok, other=0.0)
        if ONE:   # the whole row in registers: read once
            mc = ch < Dm
            xh, dxh, s1, s2, dw, db = _bwd_pass1(y_row, g_row, z_row, dz_row, mean, rstd, w_ptr, b_ptr,
                                                 dz_ptr, sy_c, sg_c, sz_c, sdz_c, ch, mc, ok, GATE, INTERP)
            dw_acc += dw
            db_acc += db
            _store_dy(xh, dxh, s1, s2, rstd, dy_row, dy_ptr, sdy_c, Dm, ch, mc, ok, INTERP)
        else:
            s1 = tl.zeros((BP,), dtype=tl.float32)
            s2 = tl.zeros((BP,), dtype=tl.float32)
            later = t > pid
            for c0 in range(0, Dm, BD):
                cc = c0 + ch
                mc = cc < Dm
                xh, dxh, ds1, ds2, dw, db = _bwd_pass1(y_row, g_row, z_row, dz_row, mean, rstd, w_ptr,
                                                       b_ptr, dz_ptr, sy_c, sg_c, sz_c, sdz_c, cc, mc, ok,
                                                       GATE, INTERP)
                s1 += ds1
                s2 += ds2
                # the program's own partial-sum row, started by its first tile (no zero fill)
                w_ptrs = dw_ptr + pid * Dm + cc
                b_ptrs = db_ptr + pid * Dm + cc
                tl.store(w_ptrs, tl.load(w_ptrs, mask=mc & later, other=0.0) + dw, mask=mc)
                tl.store(b_ptrs, tl.load(b_ptrs, mask=mc & later, other=0.0) + db, mask=mc)
            for c0 in range(0, Dm, BD):
                cc = c0 + ch
                mc = cc < Dm
                xh, dxh, dn, dz = _bwd_terms(y_row, g_row, z_row, mean, rstd, w_ptr, b_ptr,
                                             sy_c, sg_c, sz_c, cc, mc, ok, GATE, INTERP)
                _store_dy(xh, dxh, s1, s2, rstd, dy_row, dy_ptr, sdy_c, Dm, cc, mc, ok, INTERP)
            tl.debug_barrier()  # this tile's partial-sum read-modify-writes are done
    if ONE:
        tl.store(dw_ptr + pid * Dm + ch, dw_acc, mask=ch < Dm)
        tl.store(db_ptr + pid * Dm + ch, db_acc, mask=ch < Dm)


# One entry point per op and direction, so that profiles name the op; the plain LayerNorm's pass
# its own pointers for the gate's (never read) and zero strides.

def _norm_gate_fwd_kernel(y_ptr, z_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, Dm, L, NQ, eps,
                          sy_b, sy_c, sy_p, sz_b, sz_p, sz_c, so_b, so_p, so_c,
                          EVEN: constexpr, ONE: constexpr, INTERP: constexpr, BD: constexpr, BP: constexpr):
    _fwd(y_ptr, z_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, Dm, L, NQ, eps,
         sy_b, sy_c, sy_p, sz_b, sz_p, sz_c, so_b, so_p, so_c, True, EVEN, ONE, INTERP, BD, BP)


def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, C, L, NQ, eps,
                           sx_b, sx_c, sx_p, so_b, so_p, so_c,
                           EVEN: constexpr, ONE: constexpr, INTERP: constexpr, BD: constexpr, BP: constexpr):
    _fwd(x_ptr, x_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, C, L, NQ, eps,
         sx_b, sx_c, sx_p, 0, 0, 0, so_b, so_p, so_c, False, EVEN, ONE, INTERP, BD, BP)


def _norm_gate_bwd_kernel(g_ptr, y_ptr, z_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dy_ptr, dz_ptr, dw_ptr, db_ptr,
                          Dm, L, NQ, n_tiles, sg_b, sg_p, sg_c, sy_b, sy_c, sy_p, sz_b, sz_p, sz_c,
                          sdy_b, sdy_c, sdy_p, sdz_b, sdz_p, sdz_c,
                          EVEN: constexpr, ONE: constexpr, INTERP: constexpr, BD: constexpr, BP: constexpr):
    _bwd(g_ptr, y_ptr, z_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dy_ptr, dz_ptr, dw_ptr, db_ptr,
         Dm, L, NQ, n_tiles, sg_b, sg_p, sg_c, sy_b, sy_c, sy_p, sz_b, sz_p, sz_c,
         sdy_b, sdy_c, sdy_p, sdz_b, sdz_p, sdz_c, True, EVEN, ONE, INTERP, BD, BP)


def _layer_norm_bwd_kernel(g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
                           C, L, NQ, n_tiles, sg_b, sg_p, sg_c, sx_b, sx_c, sx_p, sdx_b, sdx_c, sdx_p,
                           EVEN: constexpr, ONE: constexpr, INTERP: constexpr, BD: constexpr, BP: constexpr):
    _bwd(g_ptr, x_ptr, x_ptr, w_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dx_ptr, dw_ptr, db_ptr,
         C, L, NQ, n_tiles, sg_b, sg_p, sg_c, sx_b, sx_c, sx_p, 0, 0, 0,
         sdx_b, sdx_c, sdx_p, 0, 0, 0, False, EVEN, ONE, INTERP, BD, BP)


_HELPERS = ("_load_y", "_load_q", "_fwd_chunk", "_bwd_terms", "_bwd_pass1",
            "_store_dy", "_fwd", "_bwd")
_KERNELS = ("_norm_gate_fwd_kernel", "_layer_norm_fwd_kernel", "_norm_gate_bwd_kernel", "_layer_norm_bwd_kernel")
_built: dict = {}


def _kernels() -> dict:
    return jit_module(globals(), _HELPERS + _KERNELS, _built)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# Not yet timed on a GPU (benchmarks/bench_norm_gate.py --sweep times alternatives). Tiles of
# BD x BP values; ptxas (sm_90, Triton 3.6) needs about 5 registers per value a thread holds in the
# forward and 13 in the backward (xhat, dxhat, g, z, dz live at once), so warps are picked for
# `per_thread` values: fwd 16 (56-80 registers at 8 warps), bwd 8 (~128 at 4 warps, 4 programs
# and 16 warps per SM). The backward's persistent grid assumes those 4 programs fit an SM: with
# 160-168 registers (61447be, 37fa07c; compile_offline prints them) only 3 fit and the grid needs
# two rounds, our reading of enc1's 0.594 -> 0.94-0.95 ms. BP >= 16 positions keeps each
# channel's y row at >= 64 contiguous bytes (two full 32-byte sectors). ONE reads y (and in the
# backward g, z) once: up to 256 channels in the forward (Dm 96, 192 padded to 128, 256), 128 in
# the backward (16 values per thread at 16 warps for 256 left one program per SM); wider rows go
# in BD-channel chunks, read twice (the second time from L1/L2), which divide the model's Dm
# (192, 384, 768, 1536). layer_norm's kernels (no gate: fewer live values; 44-126 registers, no
# spills at the model's shapes in compile_offline) use the same configuration, not yet timed for them
# (benchmarks/bench_layer_norm.py --sweep).
_DEFAULTS = {"fwd": dict(BD=128, max_one=256, tile=4096, min_bp=16, max_bp=64, per_thread=16),
             "bwd": dict(BD=64, max_one=128, tile=1024, min_bp=16, max_bp=64, per_thread=8,
                         warps_per_sm=16)}
CONFIG_OVERRIDE: dict = {}
_SMS: dict = {}


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _config(kind, Bt, Dm, L, device):
    o = {**_DEFAULTS[kind], **CONFIG_OVERRIDE.get(kind, {})}
    one = _pow2(Dm) <= o["max_one"]
    bd = _pow2(Dm) if one else min(o["BD"], _pow2(Dm))
    bp = max(o["min_bp"], min(o["max_bp"], o["tile"] // bd))
    even = False
    cand = bp
    while cand >= o["min_bp"]:   # tiles inside one plane when a tile size down to min_bp divides L
        if L % cand == 0:
            bp, even = cand, True
            break
        cand //= 2
    warps = o.get("num_warps") or min(16, max(1, bd * bp // (32 * o["per_thread"])))
    n_tiles = -(-Bt * L // bp)
    grid = n_tiles
    if kind == "bwd":   # persistent programs: a few partial-sum rows of dw, db
        if device.type == "cuda":
            if device not in _SMS:
                _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
            slots = _SMS[device] * max(1, o["warps_per_sm"] // warps)
        else:
            slots = 3  # the interpreter: a few programs, several tiles each
        grid = min(n_tiles, slots)
    return dict(BD=bd, BP=bp, ONE=one, EVEN=even, n_tiles=n_tiles, grid=(grid,), num_warps=warps,
                num_stages=o.get("num_stages", 1))


def _launch_fwd(x3, z3, weight, bias, out3, mean, rstd, eps):
    """The forward over positions (b, p) of B planes of L: x3 (B, L, C) any strides, the rows to
    normalise; z3 (B, L, C) the gate, or None for the plain LayerNorm; out3 (B, L, C); mean, rstd
    fp32 with B * L elements (row-major over (b, p)), written."""
    k = _kernels()
    B, L, C = x3.shape
    cfg = _config("fwd", B, C, L, x3.device)
    sx_b, sx_p, sx_c = x3.stride()
    meta = dict(EVEN=cfg["EVEN"], ONE=cfg["ONE"], INTERP=interpreting(), BD=cfg["BD"], BP=cfg["BP"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    w, b = weight.contiguous(), bias.contiguous()
    if z3 is None:
        k["_layer_norm_fwd_kernel"][cfg["grid"]](
            x3, w, b, out3, mean, rstd, C, L, B * L, float(eps), sx_b, sx_c, sx_p, *out3.stride(), **meta)
    else:
        k["_norm_gate_fwd_kernel"][cfg["grid"]](
            x3, z3, w, b, out3, mean, rstd, C, L, B * L, float(eps), sx_b, sx_c, sx_p, *z3.stride(),
            *out3.stride(), **meta)


def _launch_bwd(g3, x3, z3, weight, bias, mean, rstd, dx3, dz3):
    """The backward of _launch_fwd: g3 the output gradient, dx3 (and dz3 with the gate) written,
    all (B, L, C) any strides (bias: only the gate reads it). Returns the per-program partial sums
    of dweight and dbias, each (programs, C) fp32: their sum over programs, in a fixed order, is
    the gradient (no atomics)."""
    k = _kernels()
    B, L, C = x3.shape
    cfg = _config("bwd", B, C, L, x3.device)
    dw = torch.empty((cfg["grid"][0], C), dtype=torch.float32, device=x3.device)
    db = torch.empty_like(dw)
    sx_b, sx_p, sx_c = x3.stride()
    sdx_b, sdx_p, sdx_c = dx3.stride()
    meta = dict(EVEN=cfg["EVEN"], ONE=cfg["ONE"], INTERP=interpreting(), BD=cfg["BD"], BP=cfg["BP"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if z3 is None:
        k["_layer_norm_bwd_kernel"][cfg["grid"]](
            g3, x3, weight.contiguous(), mean, rstd, dx3, dw, db, C, L, B * L, cfg["n_tiles"],
            *g3.stride(), sx_b, sx_c, sx_p, sdx_b, sdx_c, sdx_p, **meta)
    else:
        k["_norm_gate_bwd_kernel"][cfg["grid"]](
            g3, x3, z3, weight.contiguous(), bias.contiguous(), mean, rstd, dx3, dz3, dw, db,
            C, L, B * L, cfg["n_tiles"], *g3.stride(), sx_b, sx_c, sx_p, *z3.stride(),
            sdx_b, sdx_c, sdx_p, *dz3.stride(), **meta)
    return dw, db


def _forward(y, z, weight, bias, eps):
    Bt, Dm, H, W = y.shape
    L = H * W
    out = torch.empty((Bt, H, W, Dm), dtype=z.dtype, device=z.device)
    mean = torch.empty((Bt, H, W), dtype=torch.float32, device=y.device)
    rstd = torch.empty_like(mean)
    # views of the scan's output (channels first: positions contiguous) and in_proj's z
    _launch_fwd(y.reshape(Bt, Dm, L).transpose(1, 2), z.reshape(Bt, L, Dm), weight, bias,
                out.view(Bt, L, Dm), mean, rstd, eps)
    return out, mean, rstd


def _backward(g, y, z, weight, bias, mean, rstd):
    Bt, Dm, H, W = y.shape
    L = H * W
    dy = torch.empty((Bt, Dm, H, W), dtype=y.dtype, device=y.device)
    dz = torch.empty((Bt, H, W, Dm), dtype=z.dtype, device=z.device)
    dw, db = _launch_bwd(g.reshape(Bt, L, Dm), y.reshape(Bt, Dm, L).transpose(1, 2), z.reshape(Bt, L, Dm),
                         weight, bias, mean, rstd, dy.view(Bt, Dm, L).transpose(1, 2), dz.view(Bt, L, Dm))
    return dy, dz, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("vmambax::norm_gate_triton_fwd", mutates_args=())
def _fwd_op(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(y, z, weight, bias, eps)


@_fwd_op.register_fake
def _(y, z, weight, bias, eps):
    Bt, Dm, H, W = y.shape
    return (z.new_empty((Bt, H, W, Dm)), y.new_empty((Bt, H, W), dtype=torch.float32),
            y.new_empty((Bt, H, W), dtype=torch.float32))


@torch.library.custom_op("vmambax::norm_gate_triton_bwd", mutates_args=())
def _bwd_op(g: torch.Tensor, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            mean: torch.Tensor, rstd: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(g, y, z, weight, bias, mean, rstd)


@_bwd_op.register_fake
def _(g, y, z, weight, bias, mean, rstd):
    return y.new_empty(y.shape), z.new_empty(z.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup(ctx, inputs, output):
    y, z, weight, bias, _eps = inputs
    ctx.save_for_backward(y, z, weight, bias, output[1], output[2])


def _backward_rule(ctx, g, _g_mean, _g_rstd):
    y, z, weight, bias, mean, rstd = ctx.saved_tensors
    # torch.library passes zeros for an unused output; None only reaches here if that changes
    g = torch.zeros_like(z) if g is None else g
    return (*_bwd_op(g, y, z, weight, bias, mean, rstd), None)


_fwd_op.register_autograd(_backward_rule, setup_context=_setup)


class _EagerFn(torch.autograd.Function):
    """The same two kernels as the ops above, for eager mode: torch.library's custom-op dispatch
    costs host time on every call (benchmarks/NOTES.md, "CGM kernel"), and SS2D calls this once
    per block. torch.compile traces the registered ops instead."""

    @staticmethod
    def forward(ctx, y, z, weight, bias, eps):
        out, mean, rstd = _forward(y, z, weight, bias, eps)
        ctx.save_for_backward(y, z, weight, bias, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, g):
        y, z, weight, bias, mean, rstd = ctx.saved_tensors
        return (*_backward(g, y, z, weight, bias, mean, rstd), None)


def norm_gate(y, z, weight, bias, eps):
    """Backend entry (arguments already validated by the public ``norm_gate``): out (Bt, H, W, Dm).

    float32/bfloat16/float16 tensors run the kernels (math in fp32); float64 anywhere runs the
    reference, since the kernels compute in fp32. Differentiable in y, z, weight and bias.
    """
    if any(t.dtype not in _DTYPES for t in (y, z, weight, bias)):
        return reference.norm_gate(y, z, weight, bias, eps)
    if torch.compiler.is_compiling():
        return _fwd_op(y, z, weight, bias, float(eps))[0]
    return _EagerFn.apply(y, z, weight, bias, float(eps))
