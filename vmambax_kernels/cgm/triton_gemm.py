"""The CGM gate's GEMM-form kernels (config key "gemm"; .triton launches them and documents the form).

Every program owns a tile of BP flattened pixels p = h W + w of one plane, with no halo and no
loop-carried state between tiles; the 3x3 neighbourhood goes through small fp32 buffers instead:

  forward:  _cgm_taps_kernel   P[b, (m, dy, dx), p] = sum_c xa[c, p] Wa[c, j] + xb[c, p] Wb[c, j]
                               (tl.dot over channel blocks, the 18 used packed columns stored)
            _cgm_shift_kernel  s_m[h, w] = sigmoid(sum over (dy, dx) of P[b, (m, dy, dx), h + dy, w + dx])
            (then .triton's _cgm_apply_kernel gates every channel; or, config "fuse_apply", both in
            _cgm_shift_apply_kernel: s per pixel tile from P, the gating of a group of channels)
  backward: _cgm_dz_kernel     dz_m = s (1 - s) sum_c c_m dy_m x_m (and dc partials)
            _cgm_dx_kernel     dx_m = dy_m gate_m (+ dp) + dzs @ W_m^T
            _cgm_dw_kernel     dW partials = x_m^T @ dzs over a chunk of pixel tiles
  with dzs[p, (m, dy, dx)] = dz_m[h - dy, w - dx] (zero outside the plane and in unused columns).

The packed weights (_wload), the fp32-exact products (_split, _mm; for 16-bit activations
_split_bf16, _dot3, _mm_half16), _gate and the gating kernel are those of .triton; its _kernels()
jits them, and _kernels() here binds them before jitting these.
"""
from __future__ import annotations

from .._triton_math import jit_module

# triton.language and its constexpr, bound by _kernels() on first use (as in .triton)
tl = constexpr = None


def _plane(MOD: constexpr, b, a_ptr, b_ptr, sa_b, sa_c, sa_h, sa_w, sb_b, sb_c, sb_h, sb_w):
    """Plane b of modality MOD's tensor of a (ct, pet) pair: its base pointer and c, h, w strides."""
    if MOD == 0:
        base = a_ptr + b * sa_b
        sc, sh, sw = sa_c, sa_h, sa_w
    else:
        base = b_ptr + b * sb_b
        sc, sh, sw = sb_c, sb_h, sb_w
    return base, sc, sh, sw


def _pix(p, W, sh, sw, FLAT: constexpr):
    """Offset of flattened pixel p in a plane; FLAT: the (h, w) strides merge (s_h = W s_w, or
    H = 1), so no division and the offsets stay visibly contiguous (vectorised, pipelined loads)."""
    if FLAT:
        off = p * sw
    else:
        off = (p // W) * sh + (p % W) * sw
    return off


def _shifted(src_ptr, b, p, H, W, NPL: constexpr, SIGN: constexpr):
    """(BP, 32) fp32 from a contiguous (Bt, NPL, H, W) buffer: column j = m 16 + (dy + 1) 4 + dx + 1
    holds plane k at pixel (h + SIGN dy, w + SIGN dx), k = the tap m 9 + (dy + 1) 3 + dx + 1 when
    NPL is 18 (P), the map m when 2 (dz); zero outside the plane and in the 14 unused columns."""
    j = tl.arange(0, 32)
    ky = (j // 4) % 4
    kx = j % 4
    if NPL == 18:
        k = (j // 16) * 9 + ky * 3 + kx
    else:
        k = j // 16
    h = p // W
    w = p % W
    hs = h[:, None] + SIGN * (ky[None, :] - 1)
    ws = w[:, None] + SIGN * (kx[None, :] - 1)
    ok = ((ky < 3) & (kx < 3))[None, :] & (p < H * W)[:, None] & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
    return tl.load(src_ptr + (b * NPL + k[None, :]) * (H * W) + hs * W + ws, mask=ok, other=0.0)


def _mod_tile(MOD: constexpr, b, p, mp, H, W, s_ptr, ca_ptr, cb_ptr, sca_b, sca_c, scb_b, scb_c,
              ua_ptr, ub_ptr, sua_b, sua_c, sua_h, sua_w, sub_b, sub_c, sub_h, sub_w,
              va_ptr, vb_ptr, sva_b, sva_c, sva_h, sva_w, svb_b, svb_c, svb_h, svb_w, FLAT: constexpr):
    """What a pixel tile of plane b reads in modality MOD (the dz and dx kernels): two (ct, pet)
    tensor pairs u and v (plane base, channel stride, pixel offsets each), c_MOD[b] (pointer,
    channel stride) and s_MOD at the tile's pixels."""
    ubase, uc, uh, uw = _plane(MOD, b, ua_ptr, ub_ptr, sua_b, sua_c, sua_h, sua_w, sub_b, sub_c, sub_h, sub_w)
    vbase, vc, vh, vw = _plane(MOD, b, va_ptr, vb_ptr, sva_b, sva_c, sva_h, sva_w, svb_b, svb_c, svb_h, svb_w)
    if MOD == 0:
        cbase = ca_ptr + b * sca_b
        cs = sca_c
    else:
        cbase = cb_ptr + b * scb_b
        cs = scb_c
    s_m = tl.load(s_ptr + (b * 2 + MOD) * (H * W) + p, mask=mp, other=0.0)
    return ubase, uc, _pix(p, W, uh, uw, FLAT), vbase, vc, _pix(p, W, vh, vw, FLAT), cbase, cs, s_m


def _cgm_taps_kernel(xa_ptr, xb_ptr, wa_ptr, wb_ptr, P_ptr, C, H, W, n_pt,
                     sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
                     swa_c, swa_h, swa_w, swb_c, swb_h, swb_w,
                     X_EXACT: constexpr, INTERP: constexpr, FLAT: constexpr, BP: constexpr, BC: constexpr):
    """Kernel A: P[b, (m, dy, dx), p] for a tile of BP pixels, all 2C channels, fp32; P is
    (Bt, 18, H, W), tap k = m 9 + (dy + 1) 3 + dx + 1 (packed column j stored at k)."""
    pid = tl.program_id(0)
    b = (pid // n_pt).to(tl.int64)
    p = (pid % n_pt) * BP + tl.arange(0, BP)
    mp = p < H * W
    acc = tl.zeros((BP, 32), dtype=tl.float32)
    acc2 = tl.zeros((BP, 32), dtype=tl.float32)
    for MOD in tl.static_range(2):
        base, sc, sh, sw = _plane(MOD, b, xa_ptr, xb_ptr, sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w)
        acc, acc2 = _taps_loop(base, sc, _pix(p, W, sh, sw, FLAT), mp, wa_ptr, wb_ptr, swa_c, swa_h, swa_w,
                               swb_c, swb_h, swb_w, C, acc, acc2, MOD, X_EXACT, INTERP, BC)
    acc = _taps_total(acc, acc2, xa_ptr, X_EXACT)
    j = tl.arange(0, 32)
    ky = (j // 4) % 4
    kx = j % 4
    k = (j // 16) * 9 + ky * 3 + kx
    ok = mp[:, None] & ((ky < 3) & (kx < 3))[None, :]
    tl.store(P_ptr + (b * 18 + k[None, :]) * (H * W) + p[:, None], acc, mask=ok)


def _cgm_shift_kernel(P_ptr, s_ptr, H, W, n_pt, INTERP: constexpr, BP: constexpr):
    """Kernel B: s_m[h, w] = sigmoid(sum over (dy, dx) of P[b, (m, dy, dx), h + dy, w + dx]) (the
    convention of .triton's _row_taps: z_m[r - dy, w] gets P_r[w + dx, (m, dy, dx)]), fp32."""
    pid = tl.program_id(0)
    b = (pid // n_pt).to(tl.int64)
    p = (pid % n_pt) * BP + tl.arange(0, BP)
    v = _shifted(P_ptr, b, p, H, W, 18, 1)
    s = _sigmoid(tl.sum(tl.reshape(v, (BP, 2, 16)), axis=2), INTERP)
    m = tl.arange(0, 2)
    tl.store(s_ptr + (b * 2 + m[None, :]) * (H * W) + p[:, None], s, mask=(p < H * W)[:, None])


def _tap_chain(P_ptr, b, p, H, W, MOD: constexpr):
    """z_MOD at pixels p (BP,): P's 9 taps of map MOD at the shifted pixels added one by one in
    packed-column order, (((t(-1,-1) + t(-1,0)) + t(-1,1)) + t(0,-1)) + ... + t(1,1), zero outside
    the plane. The order _cgm_shift_kernel's tl.sum takes when compiled (sm_90, Triton 3.6) on tiles
    of >= 128 pixels (planes of >= 128 pixels; 256 at the stage shapes): its (256, 32) load gives each
    thread one pixel's 32 columns (TTGIR: sizePerThread [1, 1],
    threadsPerWarp [32, 1], warpsPerCTA [4, 1]), which the reduction adds in sequence (LLVM IR: one
    chain of fadds over the 16 columns, the 7 unused ones masked to +0.0, which changes no sum but a
    -0.0, and sigmoid(-0) = sigmoid(+0)). Summed through tl.sum here, the layout of a (BP, 32) load
    in this kernel (shared with the x tiles) splits a map's columns over two warps: another order."""
    h = p // W
    w = p % W
    inside = p < H * W
    for dy in tl.static_range(3):
        for dx in tl.static_range(3):
            hs = h + (dy - 1)
            ws = w + (dx - 1)
            ok = inside & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
            t = tl.load(P_ptr + (b * 18 + MOD * 9 + dy * 3 + dx) * (H * W) + hs * W + ws, mask=ok, other=0.0)
            if dy == 0 and dx == 0:
                z = t
            else:
                z = z + t
    return z


def _fused_s(P_ptr, b, p, H, W, INTERP: constexpr, BP: constexpr):
    """(s_0, s_1) at pixels p, bit for bit _cgm_shift_kernel's: compiled, the taps added in its order
    (_tap_chain); interpreted, its very expression (numpy's sum over the 16 columns has its own order)."""
    if INTERP:
        v = _shifted(P_ptr, b, p, H, W, 18, 1)
        s0, s1 = tl.split(_sigmoid(tl.sum(tl.reshape(v, (BP, 2, 16)), axis=2), INTERP))
    else:
        s0 = _sigmoid(_tap_chain(P_ptr, b, p, H, W, 0), INTERP)
        s1 = _sigmoid(_tap_chain(P_ptr, b, p, H, W, 1), INTERP)
    return s0, s1


def _cgm_shift_apply_kernel(xa_ptr, xb_ptr, ya_ptr, yb_ptr, P_ptr, s_ptr, ca_ptr, cb_ptr,
                            C, H, W, n_pt, n_cg, CG,
                            sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
                            sya_b, sya_c, sya_h, sya_w, syb_b, syb_c, syb_h, syb_w,
                            sca_b, sca_c, scb_b, scb_c,
                            RESIDUAL: constexpr, INTERP: constexpr, FLAT: constexpr,
                            BP: constexpr, BC: constexpr):
    """Kernels B and the gating fused (config key "gemm": {"fuse_apply": True}): for a tile of BP
    pixels of plane b and channel group g (channels [g CG, g CG + CG), CG a multiple of BC; n_cg
    groups), s from P (_fused_s: the shift kernel's values), then y_m = x_m gate_m for the group's
    channels of both modalities, BC at a time. Group 0 stores s (the backward's input); the other
    groups recompute it (18 fp32 taps a pixel from L2) and only gate. Program pid = tile n_cg + g:
    the groups of a tile run next to each other, so its P is read from L2 while still there."""
    pid = tl.program_id(0)
    g = pid % n_cg
    tile = pid // n_cg
    b = (tile // n_pt).to(tl.int64)
    p = (tile % n_pt) * BP + tl.arange(0, BP)
    mp = p < H * W
    s0, s1 = _fused_s(P_ptr, b, p, H, W, INTERP, BP)
    tl.store(s_ptr + b * 2 * (H * W) + p, s0, mask=mp & (g == 0))
    tl.store(s_ptr + (b * 2 + 1) * (H * W) + p, s1, mask=mp & (g == 0))
    c_lo = g * CG
    c_hi = tl.minimum(c_lo + CG, C)
    for MOD in tl.static_range(2):
        xbase, xc, xh, xw = _plane(MOD, b, xa_ptr, xb_ptr, sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w)
        ybase, yc, yh, yw = _plane(MOD, b, ya_ptr, yb_ptr, sya_b, sya_c, sya_h, sya_w, syb_b, syb_c, syb_h, syb_w)
        xoff = _pix(p, W, xh, xw, FLAT)
        yoff = _pix(p, W, yh, yw, FLAT)
        if MOD == 0:
            cbase = ca_ptr + b * sca_b
            cs = sca_c
            s_m = s0
        else:
            cbase = cb_ptr + b * scb_b
            cs = scb_c
            s_m = s1
        for c0 in range(c_lo, c_hi, BC):
            ch = c0 + tl.arange(0, BC)
            mc = ch < C    # c_hi is C or a multiple of BC
            msk = mp[:, None] & mc[None, :]
            gate = _gate(cbase, cs, ch, mc, s_m, RESIDUAL)
            x = tl.load(xbase + ch[None, :] * xc + xoff[:, None], mask=msk, other=0.0).to(tl.float32)
            y = _round_bf16(x * gate, ya_ptr, INTERP)
            tl.store(ybase + ch[None, :] * yc + yoff[:, None], y.to(ya_ptr.dtype.element_ty), mask=msk)


def _cgm_dz_kernel(ga_ptr, gb_ptr, xa_ptr, xb_ptr, s_ptr, ca_ptr, cb_ptr, dz_ptr, dc_ptr, C, H, W, n_pt,
                   sga_b, sga_c, sga_h, sga_w, sgb_b, sgb_c, sgb_h, sgb_w,
                   sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
                   sca_b, sca_c, scb_b, scb_c,
                   HAS_DC: constexpr, FLAT: constexpr, BP: constexpr, BC: constexpr, LANES: constexpr = False):
    """Kernel G: dz_m[p] = s (1 - s) sum_c c_m dy_m x_m into dz (Bt, 2, H, W) fp32; with HAS_DC,
    this program's dc partial sums dc[pid, m, c] = sum over its pixels of dy_m x_m s_m. LANES
    (config "dz": {"lanes": True}): the channel sum kept per (pixel, lane) over the channel blocks
    and reduced across the lanes once, instead of a cross-lane reduction per block."""
    pid = tl.program_id(0)
    b = (pid // n_pt).to(tl.int64)
    p = (pid % n_pt) * BP + tl.arange(0, BP)
    mp = p < H * W
    for MOD in tl.static_range(2):
        gbase, gc, goff, xbase, xc, xoff, cbase, cs, s_m = _mod_tile(
            MOD, b, p, mp, H, W, s_ptr, ca_ptr, cb_ptr, sca_b, sca_c, scb_b, scb_c,
            ga_ptr, gb_ptr, sga_b, sga_c, sga_h, sga_w, sgb_b, sgb_c, sgb_h, sgb_w,
            xa_ptr, xb_ptr, sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w, FLAT)
        ds = tl.zeros((BP,), dtype=tl.float32)
        dl = tl.zeros((BP, BC), dtype=tl.float32)
        for c0 in range(0, C, BC):
            ch = c0 + tl.arange(0, BC)
            mc = ch < C
            msk = mp[:, None] & mc[None, :]
            cc = tl.load(cbase + ch * cs, mask=mc, other=0.0).to(tl.float32)
            x = tl.load(xbase + ch[None, :] * xc + xoff[:, None], mask=msk, other=0.0).to(tl.float32)
            gy = tl.load(gbase + ch[None, :] * gc + goff[:, None], mask=msk, other=0.0).to(tl.float32)
            if LANES:
                dl += gy * x * cc[None, :]
            else:
                ds += tl.sum(gy * x * cc[None, :], axis=1)
            if HAS_DC:
                tl.store(dc_ptr + (pid.to(tl.int64) * 2 + MOD) * C + ch, tl.sum(gy * x * s_m[:, None], axis=0),
                         mask=mc)
        if LANES:
            ds = tl.sum(dl, axis=1)
        tl.store(dz_ptr + (b * 2 + MOD) * (H * W) + p, ds * s_m * (1.0 - s_m), mask=mp)


def _dx_taps_fma(acc, dz_ptr, b, p, mp, H, W, wa_ptr, wb_ptr, swa_c, swa_h, swa_w, swb_c, swb_h, swb_w,
                 C, ch, mc, MOD: constexpr):
    """acc + dzs @ W_MOD^T as 18 broadcast fp32 multiply-adds per element, in (map, dy, dx) order:
    each tap's shifted dz over the pixel tile (an L1-resident [BP] load) times that tap's weights of
    channels ch (a [BC] load). No tensor-core split: every product and sum is an fp32 operation.
    The dz loads repeat per channel block and modality: 18 vectors cannot be hoisted into a Triton
    list, and the [BP] loads cost little against the block's 18 x BP x BC multiply-adds."""
    h = p // W
    w = p % W
    for m in tl.static_range(2):
        if m == MOD:   # w_m's input channel: X_m is the second half of cat([X_other, X_m])
            row = ch + C
        else:
            row = ch
        if m == 0:
            wrow = wa_ptr + row * swa_c
            sh, sw = swa_h, swa_w
        else:
            wrow = wb_ptr + row * swb_c
            sh, sw = swb_h, swb_w
        plane = dz_ptr + (b * 2 + m) * (H * W)
        for ky in tl.static_range(3):
            hs = h - (ky - 1)
            ok_h = mp & (hs >= 0) & (hs < H)
            for kx in tl.static_range(3):
                ws = w - (kx - 1)
                dzv = tl.load(plane + hs * W + ws, mask=ok_h & (ws >= 0) & (ws < W), other=0.0)
                wv = tl.load(wrow + ky * sh + kx * sw, mask=mc, other=0.0).to(tl.float32)
                acc += dzv[:, None] * wv[None, :]
    return acc


def _cgm_dx_kernel(ga_ptr, gb_ptr, dz_ptr, s_ptr, ca_ptr, cb_ptr, wa_ptr, wb_ptr, dxa_ptr, dxb_ptr, dp_ptr,
                   C, H, W, n_pt,
                   sga_b, sga_c, sga_h, sga_w, sgb_b, sgb_c, sgb_h, sgb_w,
                   sda_b, sda_c, sda_h, sda_w, sdb_b, sdb_c, sdb_h, sdb_w,
                   sca_b, sca_c, scb_b, scb_c, swa_c, swa_h, swa_w, swb_c, swb_h, swb_w,
                   RESIDUAL: constexpr, X_EXACT: constexpr, INTERP: constexpr, HAS_DP: constexpr,
                   FLAT: constexpr, DX_FMA: constexpr, BP: constexpr, BC: constexpr):
    """Kernel X: dx_m = dy_m gate_m (+ dp, as in .triton's backward) + dzs @ W_m^T for a tile of BP
    pixels, every channel; dzs (BP, 32) is built once and serves both modalities. DX_FMA: the taps
    product as fp32 multiply-adds (_dx_taps_fma) instead of the exact-split tensor-core products."""
    pid = tl.program_id(0)
    b = (pid // n_pt).to(tl.int64)
    p = (pid % n_pt) * BP + tl.arange(0, BP)
    mp = p < H * W
    if not DX_FMA:
        dzs = _shifted(dz_ptr, b, p, H, W, 2, -1)
        if X_EXACT:   # 16-bit dx: bfloat16 parts (_mm_half16)
            dz0, dz1, dz2 = _split_bf16(dzs, INTERP)
        else:
            dz0, dz1, dz2 = _split(dzs, False)
    for MOD in tl.static_range(2):
        gbase, gc, goff, dbase, dcs, doff, cbase, cs, s_m = _mod_tile(
            MOD, b, p, mp, H, W, s_ptr, ca_ptr, cb_ptr, sca_b, sca_c, scb_b, scb_c,
            ga_ptr, gb_ptr, sga_b, sga_c, sga_h, sga_w, sgb_b, sgb_c, sgb_h, sgb_w,
            dxa_ptr, dxb_ptr, sda_b, sda_c, sda_h, sda_w, sdb_b, sdb_c, sdb_h, sdb_w, FLAT)
        for c0 in range(0, C, BC):
            ch = c0 + tl.arange(0, BC)
            mc = ch < C
            msk = mp[:, None] & mc[None, :]
            gate = _gate(cbase, cs, ch, mc, s_m, RESIDUAL)
            gy = tl.load(gbase + ch[None, :] * gc + goff[:, None], mask=msk, other=0.0).to(tl.float32)
            dx_gate = _dx_gate(gy, gate, dp_ptr, b, MOD, C, ch, mc, HAS_DP)
            if DX_FMA:
                dx = _dx_taps_fma(dx_gate, dz_ptr, b, p, mp, H, W, wa_ptr, wb_ptr, swa_c, swa_h, swa_w,
                                  swb_c, swb_h, swb_w, C, ch, mc, MOD)
                dx = _round_bf16(dx, dxa_ptr, INTERP)
            else:
                w = _wload(wa_ptr, wb_ptr, swa_c, swa_h, swa_w, swb_c, swb_h, swb_w, C, ch, mc, MOD, True)
                dx = _dx_mm(dz0, dz1, dz2, w, dx_gate, dxa_ptr, X_EXACT, INTERP)
            tl.store(dbase + ch[None, :] * dcs + doff[:, None], dx.to(dxa_ptr.dtype.element_ty), mask=msk)


def _dw_tile(base, sc, sh, sw, ch, mc, p, mp, W, dz0, dz1, dz2, acc, X_EXACT: constexpr, FLAT: constexpr):
    """acc + x[ch, p]^T-tile @ dzs: (BC, 32); dz's parts bfloat16 (_split_bf16) for bfloat16 x, tf32
    (_split) else. The tile's product starts from zero and is added to acc once, as in _mm."""
    x = tl.load(base + ch[:, None] * sc + _pix(p, W, sh, sw, FLAT)[None, :], mask=mc[:, None] & mp[None, :],
                other=0.0)
    if x.dtype == tl.bfloat16:
        acc += _dot3(x, dz0, dz1, dz2, tl.zeros_like(acc))
    else:
        x0, x1, x2 = _split(x.to(tl.float32), X_EXACT)
        acc = _mm(x0, x1, x2, dz0, dz1, dz2, acc, X_EXACT)
    return acc


def _dw_store(dw_prog, acc, ch, mc, C, MOD: constexpr):
    """Packed (MOD, c, j) -> dW of map m = j // 16 at input channel c + C (MOD == m), tap (dy, dx)."""
    j = tl.arange(0, 32)
    jm = (j // 16)[None, :]
    jy = ((j // 4) % 4)[None, :]
    jx = (j % 4)[None, :]
    row = ch[:, None] + C * (jm == MOD).to(tl.int32)
    tl.store(dw_prog + jm * (2 * C * 9) + row * 9 + jy * 3 + jx, acc, mask=mc[:, None] & (jy < 3) & (jx < 3))


def _cgm_dw_kernel(xa_ptr, xb_ptr, dz_ptr, dw_ptr, C, H, W, n_pt, n_chp, TPC,
                   sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
                   X_EXACT: constexpr, INTERP: constexpr, FLAT: constexpr, BP: constexpr, BC: constexpr):
    """Kernel W: chunk q (TPC pixel tiles of plane b), channel block program_id(1) of both
    modalities: dw[q] (2, 2C, 9) gets sum over the chunk of x_MOD^T @ dzs in its own rows (every
    row of dw[q] is written by exactly one program: no zero fill, no read-modify-write)."""
    q = tl.program_id(0)
    b = (q // n_chp).to(tl.int64)
    t0 = (q % n_chp) * TPC
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = ch < C
    acc_a = tl.zeros((BC, 32), dtype=tl.float32)
    acc_b = tl.zeros((BC, 32), dtype=tl.float32)
    for t in range(t0, tl.minimum(t0 + TPC, n_pt)):
        p = t * BP + tl.arange(0, BP)
        mp = p < H * W
        dzs = _shifted(dz_ptr, b, p, H, W, 2, -1)
        # bfloat16 x: bfloat16 parts of dz (_dot3); float16 x keeps tf32 parts, as dz's range is
        # unbounded and x is an operand (a float16 part of dz could overflow or underflow)
        if xa_ptr.dtype.element_ty == tl.bfloat16:
            dz0, dz1, dz2 = _split_bf16(dzs, INTERP)
        else:
            dz0, dz1, dz2 = _split(dzs, False)
        acc_a = _dw_tile(xa_ptr + b * sxa_b, sxa_c, sxa_h, sxa_w, ch, mc, p, mp, W, dz0, dz1, dz2, acc_a,
                         X_EXACT, FLAT)
        acc_b = _dw_tile(xb_ptr + b * sxb_b, sxb_c, sxb_h, sxb_w, ch, mc, p, mp, W, dz0, dz1, dz2, acc_b,
                         X_EXACT, FLAT)
    dw_prog = dw_ptr + q.to(tl.int64) * 2 * 2 * C * 9
    _dw_store(dw_prog, acc_a, ch, mc, C, 0)
    _dw_store(dw_prog, acc_b, ch, mc, C, 1)


_SHARED = ("_split", "_split_bf16", "_dot3", "_mm", "_mm_half16", "_wload", "_taps_loop", "_taps_total",
           "_gate", "_dx_gate", "_dx_mm")   # .triton's, jitted there
_HELPERS = ("_plane", "_pix", "_shifted", "_tap_chain", "_fused_s", "_mod_tile", "_dx_taps_fma", "_dw_tile",
            "_dw_store")
_KERNELS = ("_cgm_taps_kernel", "_cgm_shift_kernel", "_cgm_shift_apply_kernel", "_cgm_dz_kernel",
            "_cgm_dx_kernel", "_cgm_dw_kernel")
_built: dict = {}


def _kernels() -> dict:
    if not _built:
        from . import triton as base
        shared = base._kernels()
        globals().update({name: shared[name] for name in _SHARED})
    return jit_module(globals(), _HELPERS + _KERNELS, _built)
