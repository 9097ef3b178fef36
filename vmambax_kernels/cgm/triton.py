"""Triton backend of the CGM gate (SPEC.md section 2): one forward and one backward kernel.

Notation: x_a = X_ct, x_b = X_pet, t = one of the 18 (map, tap) pairs. Both 3x3 convolutions
reduce over all 2C channels before any output can be gated, so a program owns a band of TH full
rows of one plane and walks it in chunks of BLOCK_P pixels, in two phases per chunk:

  phase 1 (channel reduction, on the band plus one halo row above and below):
      forward   Q[p, t]  = sum_c xa[c, p] * Wa[c, t] + xb[c, p] * Wb[c, t]       (tl.dot)
      backward  dz_m[p]  = s_m (1 - s_m) * sum_c c_m[c] dy_m[c, p] x_m[c, p]
    stored in a small per-program ring buffer in global memory (it stays in L1/L2);
  phase 2 (per channel, own pixels only), after a CTA barrier:
      forward   z_m[p] = sum of the 9 shifted Q[p + off, t] of map m; s = sigmoid(z);
                y_m = x_m * (1 + c_m s_m)   (or x_m * c_m s_m)
      backward  dzs[p, t] = dz_m[p - off];  dx_m = dy_m (1 + c_m s_m) + dzs @ W_m^T;
                dW_m += x_m^T @ dzs;  dc_m += sum_p dy_m x_m s_m.

Phase 1 runs one chunk ahead of phase 2, so between the two reads of a pixel only about
2 * BLOCK_P + W pixels of all channels are touched: the aim is that the second read hits L2 and
each input comes from memory about once (not yet measured on a GPU). Wa/Wb pack the two weights by input: column t < 9 feeds z_ct, t >= 9 z_pet.

The convolution products run on tensor cores in fp32 accuracy: an fp32 operand is split into
three tf32-exact parts (hi, mid, lo) whose products are exact in fp32; bf16/fp16 activations are
already tf32-exact. The forward saves s (Bt, 2, H, W) in fp32 for the backward.

Runs on CUDA GPUs, or on CPU tensors under TRITON_INTERPRET=1 (tests). Kernels are defined on the
first launch, because Triton picks compiling or interpreting when a kernel is defined.
"""
from __future__ import annotations

import torch

from .._triton_env import availability, fix_interpreter_index, interpreting  # noqa: F401  (backend API)

from . import reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NT = 32  # 18 (map, tap) columns padded to a tl.dot size


# ----------------------------------------------------------------------------------------------
# Kernels (plain functions here; _kernels() turns them into Triton functions on first use)
# ----------------------------------------------------------------------------------------------
# triton.language and its constexpr, bound by _kernels(): importing Triton waits for the first launch
tl = constexpr = None


def _tf32_trunc(x):
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


def _split(a, EXACT: constexpr):
    """Three tf32-exact parts (11 + 11 + 2 significant bits) that sum to the fp32 ``a``; ``a``
    itself (parts 1 and 2 unused) when it is already tf32-exact (bf16/fp16 data)."""
    if EXACT:
        a0 = a
        a1 = a
        a2 = a
    else:
        a0 = _tf32_trunc(a)
        r = a - a0
        a1 = _tf32_trunc(r)
        a2 = r - a1
    return a0, a1, a2


def _mm(a0, a1, a2, b0, b1, b2, acc, A_EXACT: constexpr, HALF: constexpr):
    """acc + (a0 + a1 + a2) @ (b0 + b1 + b2) in fp32 accuracy on tf32 tensor cores: products of
    tf32-exact parts are exact in fp32; the cross terms left out are below 2**-33 relative.
    HALF keeps the terms above 2**-21 only, for results stored in 16 bits."""
    acc = tl.dot(a0, b0, acc, input_precision="tf32")
    acc = tl.dot(a0, b1, acc, input_precision="tf32")
    if not HALF:
        acc = tl.dot(a0, b2, acc, input_precision="tf32")
    if not A_EXACT:
        acc = tl.dot(a1, b0, acc, input_precision="tf32")
        if not HALF:
            acc = tl.dot(a2, b0, acc, input_precision="tf32")
            acc = tl.dot(a1, b1, acc, input_precision="tf32")
    return acc


def _w_tiles(wk_ptr, row0, C, ch, mc, TRANS: constexpr):
    """The three parts of rows row0 + ch of the packed weights, (BLOCK_C, 32) or transposed."""
    t = tl.arange(0, 32)
    if TRANS:
        offs = (row0 + ch[None, :]) * 32 + t[:, None]
        m = mc[None, :]
    else:
        offs = (row0 + ch[:, None]) * 32 + t[None, :]
        m = mc[:, None]
    part = 2 * C * 32
    return (tl.load(wk_ptr + offs, mask=m, other=0.0), tl.load(wk_ptr + part + offs, mask=m, other=0.0),
            tl.load(wk_ptr + 2 * part + offs, mask=m, other=0.0))


def _tile(ptr, b, sb, sc, sp, pix, mp, ch, mc):
    """(BLOCK_P, BLOCK_C) fp32 tile of a (Bt, C, H*W)-indexed tensor; zero where masked."""
    # 64-bit only for the plane's start: int64 offsets per element cost 2 registers each
    base = ptr + b.to(tl.int64) * sb
    return tl.load(base + (ch[None, :] * sc + pix[:, None] * sp), mask=mp[:, None] & mc[None, :],
                   other=0.0).to(tl.float32)


def _store_tile(ptr, val, b, sb, sc, sp, pix, mp, ch, mc, INTERP: constexpr):
    if INTERP:
        if ptr.dtype.element_ty == tl.bfloat16:
            # The interpreter truncates fp32 -> bf16; round to nearest even as the GPU does.
            bits = val.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            val = bits.to(tl.float32, bitcast=True)
    base = ptr + b.to(tl.int64) * sb
    tl.store(base + (ch[None, :] * sc + pix[:, None] * sp), val.to(ptr.dtype.element_ty),
             mask=mp[:, None] & mc[None, :])


def _neighbours(pix, mp, H, W, SIGN: constexpr):
    """For each pixel and column t (BLOCK_P, NT): the pixel p + SIGN * off(t), whether it is in
    the plane, and the map m of column t (t // 9)."""
    t = tl.arange(0, 32)
    k = t % 9
    dy = k // 3 - 1
    dx = k % 3 - 1
    h = pix // W
    w = pix - h * W
    nh = h[:, None] + SIGN * dy[None, :]
    nw = w[:, None] + SIGN * dx[None, :]
    ok = mp[:, None] & (t[None, :] < 18) & (nh >= 0) & (nh < H) & (nw >= 0) & (nw < W)
    return nh * W + nw, ok, t // 9


def _band(tile, n_bands, TH, H, W):
    b = tile // n_bands
    o_lo = (tile % n_bands) * TH * W
    o_hi = tl.minimum(o_lo + TH * W, H * W)
    return b, o_lo, o_hi, tl.maximum(o_lo - W, 0), tl.minimum(o_hi + W, H * W)


def _cgm_fwd_kernel(xa_ptr, xb_ptr, ya_ptr, yb_ptr, s_ptr, ca_ptr, cb_ptr, wk_ptr, ring_ptr,
                    C, H, W, n_bands, n_tiles, TH, RING,
                    sxa_b, sxa_c, sxa_p, sxb_b, sxb_c, sxb_p,
                    sya_b, sya_c, sya_p, syb_b, syb_c, syb_p,
                    RESIDUAL: constexpr, X_EXACT: constexpr, INTERP: constexpr,
                    BLOCK_P: constexpr, BLOCK_C: constexpr):
    # The two modalities are walked one after the other (static MOD loops) rather than side by
    # side: half the tiles live at once (ptxas, sm_90: 255 registers with spills side by side).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    HW = H * W
    ring = ring_ptr + pid.to(tl.int64) * 32 * RING   # [32, RING] fp32: Q[t, p % RING]
    t = tl.arange(0, 32)
    for tile in range(pid, n_tiles, nprog):
        b, o_lo, o_hi, x_lo, x_hi = _band(tile, n_bands, TH, H, W)
        s_row = s_ptr + b.to(tl.int64) * 2 * HW
        done = x_lo
        tl.debug_barrier()  # the previous tile's phase 2 has read the ring
        for p0 in range(o_lo, o_hi, BLOCK_P):
            need = tl.minimum(p0 + BLOCK_P + W + 1, x_hi)
            while done < need:  # phase 1: Q on the next chunk of the band + halo
                pe = done + tl.arange(0, BLOCK_P)
                me = pe < x_hi
                acc = tl.zeros((BLOCK_P, 32), dtype=tl.float32)
                for MOD in tl.static_range(2):
                    if MOD == 0:
                        x_ptr, sb, sc, sp = xa_ptr, sxa_b, sxa_c, sxa_p
                    else:
                        x_ptr, sb, sc, sp = xb_ptr, sxb_b, sxb_c, sxb_p
                    for c0 in range(0, C, BLOCK_C):
                        ch = c0 + tl.arange(0, BLOCK_C)
                        mc = ch < C
                        w0, w1, w2 = _w_tiles(wk_ptr, MOD * C, C, ch, mc, False)
                        x0, x1, x2 = _split(_tile(x_ptr, b, sb, sc, sp, pe, me, ch, mc), X_EXACT)
                        acc = _mm(x0, x1, x2, w0, w1, w2, acc, X_EXACT, False)
                tl.store(ring + t[None, :] * RING + (pe & (RING - 1))[:, None], acc,
                         mask=me[:, None] & (t[None, :] < 18))
                done += BLOCK_P
            tl.debug_barrier()  # Q of the chunk and its halo is in the ring
            # phase 2: spatial gates of the chunk, then every channel gated
            pix = p0 + tl.arange(0, BLOCK_P)
            mp = pix < o_hi
            nb, ok, m = _neighbours(pix, mp, H, W, 1)
            q = tl.load(ring + t[None, :] * RING + (nb & (RING - 1)), mask=ok, other=0.0)
            for MOD in tl.static_range(2):
                if MOD == 0:
                    x_ptr, sb, sc, sp, c_ptr = xa_ptr, sxa_b, sxa_c, sxa_p, ca_ptr
                    y_ptr, tb, tc, tp = ya_ptr, sya_b, sya_c, sya_p
                else:
                    x_ptr, sb, sc, sp, c_ptr = xb_ptr, sxb_b, sxb_c, sxb_p, cb_ptr
                    y_ptr, tb, tc, tp = yb_ptr, syb_b, syb_c, syb_p
                s_m = tl.sigmoid(tl.sum(tl.where(m[None, :] == MOD, q, 0.0), axis=1))
                tl.store(s_row + MOD * HW + pix, s_m, mask=mp)
                for c0 in range(0, C, BLOCK_C):
                    ch = c0 + tl.arange(0, BLOCK_C)
                    mc = ch < C
                    gate = tl.load(c_ptr + b * C + ch, mask=mc, other=0.0)[None, :] * s_m[:, None]
                    if RESIDUAL:
                        gate += 1.0
                    x = _tile(x_ptr, b, sb, sc, sp, pix, mp, ch, mc)
                    _store_tile(y_ptr, x * gate, b, tb, tc, tp, pix, mp, ch, mc, INTERP)
            tl.debug_barrier()  # phase 1 of the next chunk may overwrite what was read


def _cgm_bwd_kernel(ga_ptr, gb_ptr, xa_ptr, xb_ptr, s_ptr, ca_ptr, cb_ptr, wk_ptr, ring_ptr,
                    dxa_ptr, dxb_ptr, dc_ptr, dw_ptr,
                    C, H, W, n_bands, n_tiles, TH, RING,
                    sga_b, sga_c, sga_p, sgb_b, sgb_c, sgb_p,
                    sxa_b, sxa_c, sxa_p, sxb_b, sxb_c, sxb_p,
                    sda_b, sda_c, sda_p, sdb_b, sdb_c, sdb_p,
                    RESIDUAL: constexpr, X_EXACT: constexpr, INTERP: constexpr,
                    BLOCK_P: constexpr, BLOCK_C: constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    HW = H * W
    ring = ring_ptr + pid.to(tl.int64) * 2 * RING    # [2, RING] fp32: dz_m[p % RING]
    dw_prog = dw_ptr + pid.to(tl.int64) * 2 * C * 18  # this program's partial dW, [2C, 18]
    t = tl.arange(0, 32)
    for tile in range(pid, n_tiles, nprog):
        b, o_lo, o_hi, x_lo, x_hi = _band(tile, n_bands, TH, H, W)
        s_row = s_ptr + b.to(tl.int64) * 2 * HW
        dc_tile = dc_ptr + tile * 2 * C  # this tile's partial dc, [2, C]
        done = x_lo
        tl.debug_barrier()
        for p0 in range(o_lo, o_hi, BLOCK_P):
            need = tl.minimum(p0 + BLOCK_P + W + 1, x_hi)
            while done < need:  # phase 1: dz on the next chunk of the band + halo
                pe = done + tl.arange(0, BLOCK_P)
                me = pe < x_hi
                for MOD in tl.static_range(2):
                    if MOD == 0:
                        x_ptr, sb, sc, sp, c_ptr = xa_ptr, sxa_b, sxa_c, sxa_p, ca_ptr
                        g_ptr, gb_, gc, gp = ga_ptr, sga_b, sga_c, sga_p
                    else:
                        x_ptr, sb, sc, sp, c_ptr = xb_ptr, sxb_b, sxb_c, sxb_p, cb_ptr
                        g_ptr, gb_, gc, gp = gb_ptr, sgb_b, sgb_c, sgb_p
                    ds = tl.zeros((BLOCK_P,), dtype=tl.float32)
                    for c0 in range(0, C, BLOCK_C):
                        ch = c0 + tl.arange(0, BLOCK_C)
                        mc = ch < C
                        cc = tl.load(c_ptr + b * C + ch, mask=mc, other=0.0)
                        x = _tile(x_ptr, b, sb, sc, sp, pe, me, ch, mc)
                        gy = _tile(g_ptr, b, gb_, gc, gp, pe, me, ch, mc)
                        ds += tl.sum(gy * x * cc[None, :], axis=1)
                    s_m = tl.load(s_row + MOD * HW + pe, mask=me, other=0.0)
                    tl.store(ring + MOD * RING + (pe & (RING - 1)), ds * s_m * (1.0 - s_m), mask=me)
                done += BLOCK_P
            tl.debug_barrier()
            # phase 2: dzs[p, t] = dz_m[p - off(t)], then every channel
            pix = p0 + tl.arange(0, BLOCK_P)
            mp = pix < o_hi
            nb, ok, m = _neighbours(pix, mp, H, W, -1)
            dz_ptrs = ring + m[None, :] * RING + (nb & (RING - 1))
            # partial sums start with the program's first chunk (no zero-filled buffers to write)
            add_w = (tile != pid) | (p0 != o_lo)
            add_c = p0 != o_lo
            for MOD in tl.static_range(2):
                if MOD == 0:
                    x_ptr, sb, sc, sp, c_ptr = xa_ptr, sxa_b, sxa_c, sxa_p, ca_ptr
                    g_ptr, gb_, gc, gp = ga_ptr, sga_b, sga_c, sga_p
                    d_ptr, db, dcs, dp = dxa_ptr, sda_b, sda_c, sda_p
                else:
                    x_ptr, sb, sc, sp, c_ptr = xb_ptr, sxb_b, sxb_c, sxb_p, cb_ptr
                    g_ptr, gb_, gc, gp = gb_ptr, sgb_b, sgb_c, sgb_p
                    d_ptr, db, dcs, dp = dxb_ptr, sdb_b, sdb_c, sdb_p
                s_m = tl.load(s_row + MOD * HW + pix, mask=mp, other=0.0)
                for c0 in range(0, C, BLOCK_C):
                    ch = c0 + tl.arange(0, BLOCK_C)
                    mc = ch < C
                    # dz is reloaded (L1) and split per channel block: kept live across the
                    # loop, its parts cost ~50 registers (ptxas, sm_90)
                    dz0, dz1, dz2 = _split(tl.load(dz_ptrs, mask=ok, other=0.0), False)
                    x = _tile(x_ptr, b, sb, sc, sp, pix, mp, ch, mc)
                    gy = _tile(g_ptr, b, gb_, gc, gp, pix, mp, ch, mc)
                    gate = tl.load(c_ptr + b * C + ch, mask=mc, other=0.0)[None, :] * s_m[:, None]
                    if RESIDUAL:
                        gate += 1.0
                    w0, w1, w2 = _w_tiles(wk_ptr, MOD * C, C, ch, mc, True)
                    dx = _mm(dz0, dz1, dz2, w0, w1, w2, gy * gate, False, X_EXACT)
                    _store_tile(d_ptr, dx, b, db, dcs, dp, pix, mp, ch, mc, INTERP)
                    x0, x1, x2 = _split(tl.trans(x), X_EXACT)
                    dw = _mm(x0, x1, x2, dz0, dz1, dz2, tl.zeros((BLOCK_C, 32), dtype=tl.float32), X_EXACT, False)
                    # partial sums owned by this program; the barriers order the read-modify-writes
                    w_ptrs = dw_prog + (MOD * C + ch[:, None]) * 18 + t[None, :]
                    mw = mc[:, None] & (t[None, :] < 18)
                    tl.store(w_ptrs, tl.load(w_ptrs, mask=mw & add_w, other=0.0) + dw, mask=mw)
                    dc = tl.sum(gy * x * s_m[:, None], axis=0)
                    c_ptrs = dc_tile + MOD * C + ch
                    tl.store(c_ptrs, tl.load(c_ptrs, mask=mc & add_c, other=0.0) + dc, mask=mc)
            tl.debug_barrier()


_HELPERS = ("_tf32_trunc", "_split", "_mm", "_w_tiles", "_tile", "_store_tile", "_neighbours", "_band")
_KERNELS = ("_cgm_fwd_kernel", "_cgm_bwd_kernel")
_built: dict = {}


def _kernels() -> dict:
    if not _built:
        import triton
        import triton.language
        g = globals()
        g["tl"], g["constexpr"] = triton.language, triton.language.constexpr
        for name in _HELPERS + _KERNELS:  # helpers first: kernels find them by global name
            g[name] = triton.jit(g[name])
            _built[name] = g[name]
        if interpreting():
            fix_interpreter_index()
    return _built


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# First guesses from ptxas on sm_90 (registers per thread at 4 warps, no spills): forward
# (64 pixels, 32 channels) 107 -> 4 programs per SM; backward (32, 16) 168 -> 3 per SM, where
# (64, 16) takes 181 and (64, 32) 255. Not yet timed on a GPU: benchmarks/bench_cgm.py --sweep
# times alternatives through CONFIG_OVERRIDE = {"fwd": {...}, "bwd": {...}} (keys as below).
_DEFAULTS = {"fwd": dict(BLOCK_P=64, BLOCK_C=32, num_warps=4, num_stages=1, programs_per_sm=4),
             "bwd": dict(BLOCK_P=32, BLOCK_C=16, num_warps=4, num_stages=1, programs_per_sm=3)}
CONFIG_OVERRIDE: dict = {}


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _config(kind, Bt, C, H, W, device):
    o = {**_DEFAULTS[kind], **CONFIG_OVERRIDE.get(kind, {})}
    block_c = max(16, min(o["BLOCK_C"], _pow2(C)))  # tl.dot needs 16
    if device.type == "cuda":
        slots = torch.cuda.get_device_properties(device).multi_processor_count * o["programs_per_sm"]
    else:
        slots = 3  # the interpreter runs programs one by one: few, but more than one tile each
    # About one band of rows per program; each band re-reads its two halo rows in phase 1.
    rows = min(H, o.get("rows") or max(1, -(-(Bt * H) // slots)))
    n_bands = -(-H // rows)
    n_tiles = Bt * n_bands
    return dict(BLOCK_P=o["BLOCK_P"], BLOCK_C=block_c, TH=rows, n_bands=n_bands, n_tiles=n_tiles,
                nprog=min(n_tiles, slots), RING=_pow2(2 * o["BLOCK_P"] + 2 * W + 2),
                num_warps=o["num_warps"], num_stages=o["num_stages"])


def _flat(x: torch.Tensor):
    """x with (H, W) addressable as one index p = h*W + w of stride sp: (x, sb, sc, sp). Channels-
    first and channels-last tensors (and expanded gradients) pass as they are; other layouts are
    copied once to contiguous."""
    Bt, C, H, W = x.shape
    if W == 1:
        sp = x.stride(2)
    elif H == 1 or x.stride(2) == W * x.stride(3):
        sp = x.stride(3)
    else:
        x = x.contiguous()
        sp = 1
    return x, x.stride(0), x.stride(1), sp


def _pack_weights(w_ct, w_pet, C):
    """(3, 2C, 32) fp32, three tf32-exact parts of: row c feeds x_ct channel c, row C + c x_pet channel c; column k < 9 is tap k
    of z_ct, column 9 + k tap k of z_pet (w_m acts on cat([X_other, X_m]))."""
    wc = w_ct.reshape(2 * C, 9).float()
    wp = w_pet.reshape(2 * C, 9).float()
    pack = torch.zeros(2 * C, NT, dtype=torch.float32, device=w_ct.device)
    pack[:C, :9], pack[:C, 9:18] = wc[C:], wp[:C]
    pack[C:, :9], pack[C:, 9:18] = wc[:C], wp[C:]
    return torch.stack(_split_host(pack))


def _split_host(a):
    """_split on the host: (3, ...) tf32-exact parts of an fp32 tensor."""
    def trunc(v):
        return (v.view(torch.int32) & -8192).view(torch.float32)
    a0 = trunc(a.contiguous())
    r = a - a0
    a1 = trunc(r)
    return a0, a1, r - a1


def _unpack_weight_grads(dpack, C, w_ct, w_pet):
    dwc = torch.cat([dpack[C:, :9], dpack[:C, :9]]).reshape(w_ct.shape).to(w_ct.dtype)
    dwp = torch.cat([dpack[:C, 9:18], dpack[C:, 9:18]]).reshape(w_pet.shape).to(w_pet.dtype)
    return dwc, dwp


def _forward(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual):
    k = _kernels()
    Bt, C, H, W = x_ct.shape
    cfg = _config("fwd", Bt, C, H, W, x_ct.device)
    xa, *sa = _flat(x_ct)
    xb, *sb = _flat(x_pet)
    ya, yb = torch.empty_like(xa), torch.empty_like(xb)
    _, *sya = _flat(ya)
    _, *syb = _flat(yb)
    s = torch.empty((Bt, 2, H, W), dtype=torch.float32, device=x_ct.device)
    ring = torch.empty((cfg["nprog"], NT, cfg["RING"]), dtype=torch.float32, device=x_ct.device)
    k["_cgm_fwd_kernel"][(cfg["nprog"],)](
        xa, xb, ya, yb, s, c_ct.float().contiguous(), c_pet.float().contiguous(),
        _pack_weights(w_ct, w_pet, C), ring,
        C, H, W, cfg["n_bands"], cfg["n_tiles"], cfg["TH"], cfg["RING"], *sa, *sb, *sya, *syb,
        RESIDUAL=residual, X_EXACT=x_ct.dtype != torch.float32, INTERP=interpreting(),
        BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return ya, yb, s


def _backward(g_ct, g_pet, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, residual):
    k = _kernels()
    Bt, C, H, W = x_ct.shape
    cfg = _config("bwd", Bt, C, H, W, x_ct.device)
    dev = x_ct.device
    ga, *sga = _flat(g_ct.to(x_ct.dtype))
    gb, *sgb = _flat(g_pet.to(x_pet.dtype))
    xa, *sxa = _flat(x_ct)
    xb, *sxb = _flat(x_pet)
    dxa, dxb = torch.empty_like(xa), torch.empty_like(xb)
    _, *sda = _flat(dxa)
    _, *sdb = _flat(dxb)
    ring = torch.empty((cfg["nprog"], 2, cfg["RING"]), dtype=torch.float32, device=dev)
    dc = torch.empty((cfg["n_tiles"], 2, C), dtype=torch.float32, device=dev)
    dw = torch.empty((cfg["nprog"], 2 * C, 18), dtype=torch.float32, device=dev)
    k["_cgm_bwd_kernel"][(cfg["nprog"],)](
        ga, gb, xa, xb, s, c_ct.float().contiguous(), c_pet.float().contiguous(),
        _pack_weights(w_ct, w_pet, C), ring, dxa, dxb, dc, dw,
        C, H, W, cfg["n_bands"], cfg["n_tiles"], cfg["TH"], cfg["RING"],
        *sga, *sgb, *sxa, *sxb, *sda, *sdb,
        RESIDUAL=residual, X_EXACT=x_ct.dtype != torch.float32, INTERP=interpreting(),
        BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    dc = dc.view(Bt, cfg["n_bands"], 2, C).sum(1)
    dwc, dwp = _unpack_weight_grads(dw.sum(0), C, w_ct, w_pet)
    return dxa, dxb, dc[:, 0].to(c_ct.dtype, copy=True), dc[:, 1].to(c_pet.dtype, copy=True), dwc, dwp


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("vmambax::cgm_gate_triton_fwd", mutates_args=())
def _fwd_op(x_ct: torch.Tensor, x_pet: torch.Tensor, c_ct: torch.Tensor, c_pet: torch.Tensor,
            w_ct: torch.Tensor, w_pet: torch.Tensor, residual: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual)


@_fwd_op.register_fake
def _(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual):
    Bt, _, H, W = x_ct.shape
    return (torch.empty_like(x_ct), torch.empty_like(x_pet),
            x_ct.new_empty((Bt, 2, H, W), dtype=torch.float32))


@torch.library.custom_op("vmambax::cgm_gate_triton_bwd", mutates_args=())
def _bwd_op(g_ct: torch.Tensor, g_pet: torch.Tensor, x_ct: torch.Tensor, x_pet: torch.Tensor,
            c_ct: torch.Tensor, c_pet: torch.Tensor, w_ct: torch.Tensor, w_pet: torch.Tensor,
            s: torch.Tensor, residual: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(g_ct, g_pet, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, residual)


@_bwd_op.register_fake
def _(g_ct, g_pet, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, residual):
    return (torch.empty_like(x_ct), torch.empty_like(x_pet), torch.empty_like(c_ct),
            torch.empty_like(c_pet), torch.empty_like(w_ct), torch.empty_like(w_pet))


def _setup(ctx, inputs, output):
    x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual = inputs
    ctx.save_for_backward(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, output[2])
    ctx.residual = residual


def _backward_rule(ctx, g_ct, g_pet, _g_s):
    x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s = ctx.saved_tensors
    # torch.library passes zeros for an unused output; None only reaches here if that changes
    g_ct = torch.zeros_like(x_ct) if g_ct is None else g_ct
    g_pet = torch.zeros_like(x_pet) if g_pet is None else g_pet
    grads = _bwd_op(g_ct, g_pet, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, ctx.residual)
    return (*grads, None)


_fwd_op.register_autograd(_backward_rule, setup_context=_setup)


def cgm_gate(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual=True):
    """Backend entry (arguments already validated by the public ``cgm_gate``): (y_ct, y_pet).

    float32/bfloat16/float16 activations run the kernels (math in fp32); float64 runs the
    reference, since the kernels compute in fp32. Differentiable in all six tensors.
    """
    if x_ct.dtype not in _DTYPES:
        return reference.cgm_gate(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual)
    y_ct, y_pet, _ = _fwd_op(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, bool(residual))
    return y_ct, y_pet
