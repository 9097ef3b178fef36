"""Triton backend of the CGM gate (SPEC.md section 2): one forward and one backward kernel.

Notation: x_a = X_ct, x_b = X_pet, m = the map (0: z_ct, 1: z_pet), (dy, dx) = a tap of the 3x3.
A program owns a strip of SR rows of one plane (all channels, a column tile of TWP pixels, the
whole width when it fits) and streams through it row by row, keeping the 3x3 neighbourhood in
registers instead of a scratch buffer:

  forward, row r:  P_r[w, (m, dy, dx)] = sum_c xa[c, r, w] Wa[c, m, dy, dx] + xb[c, r, w] Wb[...]
        (tl.dot over the 2C channels, one column per (map, tap)); a column shift by dx
        (tl.gather along w) and a sum over dx leave the row's contribution to z_m of rows
        r + 1, r, r - 1, added to two row accumulators carried by the loop. Row r - 1 is then
        complete: s = sigmoid(z), and every channel of row r - 1 is gated (y = x (1 + c s)), its
        x read a second time while still in L1/L2 (one row of all channels ago).
  backward, row r: dz_m[r, w] = s (1 - s) sum_c c_m dy_m x_m (CUDA-core reduction); the three
        dz rows r - 2..r are carried; for row r - 1, dzs[w, (m, dy, dx)] = dz_m[r - 1 - dy, w - dx]
        (tl.gather), then per channel block dx_m = dy_m gate + dzs @ W_m^T, dW_m += x_m^T dzs
        (tl.dot), dc_m += sum_w dy_m x_m s_m. dW and dc are per-program partial sums in global
        memory (read-modify-write per row, L1/L2 hot), summed on the host after the launch.

Each input is thus read from memory once per pass (the strip's two halo rows are also read by the
neighbouring strip, mostly from L2), each output written once; the forward saves s (Bt, 2, H, W)
in fp32 for the backward.

Packed weights: row c of modality MOD, column j = m * 16 + (dy + 1) * 4 + (dx + 1) (32 columns,
18 used) holds w_m[c + C * (MOD == m), dy + 1, dx + 1] (w_m acts on cat([X_other, X_m])); the
kernels read it from w_ct and w_pet directly, so the host adds no packing ops.

The channel reductions run on tensor cores in fp32 accuracy: an fp32 operand is split into
three tf32-exact parts (hi, mid, lo) whose products are exact in fp32; bf16/fp16 activations are
already tf32-exact. With 16-bit activations both forwards' taps product runs in their own dtype
instead, the fp32 weights split into three exact 16-bit parts (_mm16: tf32 operands must be
K-major, which pixel-major x tiles are not); in the backwards, dx's product runs on bfloat16
parts of dz and of the weights (_mm_half16), and with bfloat16 activations dW's on bfloat16
parts of dz (_dot3).

GEMM form (config key "gemm"; the 16-bit default at most widths, see _BY_WIDTH_16BIT; kernels in triton_gemm.py): the same sums as plain
GEMMs over tiles of BP flattened pixels of one plane, with no halo and no loop-carried state, the
3x3 neighbourhood going through small fp32 buffers instead of registers. Forward: P[b, (m, dy, dx),
p] = sum_c X[c, p] Wpack[c, j] (tl.dot over channel blocks, the 18 used columns stored, 72 B a
pixel), then per pixel z_m = the sum of P's 9 taps of map m at the shifted pixels, s = sigmoid(z),
then _cgm_apply_kernel gates every channel (as the split forward); with "fuse_apply" (a variant,
not a default) one kernel does both, reading P's taps at each pixel tile's shifted pixels.
Backward: dz (Bt, 2, H, W) from dy, x, s (with the dc partials per tile); dx = dy gate (+ dp) +
dzs @ Wpack^T with dzs (BP, 32) the 18 shifted dz values of each pixel; dW partials = x^T @ dzs
per chunk of tiles and channel block. With n e the bytes of one modality's x, the forward moves
6 n e instead of 4 n e (x read twice) and the backward 10 n e instead of 6 n e (x and dy read
twice), plus the fp32 buffers.

Runs on CUDA GPUs, or on CPU tensors under TRITON_INTERPRET=1 (tests). Kernels are defined on the
first launch, because Triton picks compiling or interpreting when a kernel is defined.
"""
from __future__ import annotations

import torch

from .._triton_env import availability, interpreting  # noqa: F401  (backend API)
from .._triton_math import jit_module

from . import reference, triton_gemm

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Kernels (plain functions here; _kernels() turns them into Triton functions on first use)
# ----------------------------------------------------------------------------------------------
# triton.language and its constexpr, bound by _kernels(): importing Triton waits for the first launch
tl = constexpr = None


def _trunc(x, KEEP: constexpr):
    """fp32 x with its low significand bits cleared: KEEP -8192 keeps tf32's 11 significant bits,
    -65536 bfloat16's 8."""
    return (x.to(tl.int32, bitcast=True) & KEEP).to(tl.float32, bitcast=True)


def _split(a, EXACT: constexpr, KEEP: constexpr = -8192):
    """Three parts that sum to the fp32 ``a`` exactly, each truncated to KEEP's bits (_trunc): tf32
    11 + 11 + 2 significant bits, or bfloat16 8 + 8 + 8 (fp32's 24); the remainder after each
    truncation has at most 24 minus the bits taken, so the subtractions are exact. ``a`` itself
    (parts 1 and 2 unused) when it is already tf32-exact (bf16/fp16 data)."""
    if EXACT:
        a0 = a
        a1 = a
        a2 = a
    else:
        a0 = _trunc(a, KEEP)
        r = a - a0
        a1 = _trunc(r, KEEP)
        a2 = r - a1
    return a0, a1, a2


def _split_bf16(a, INTERP: constexpr):
    """The fp32 ``a`` as three bfloat16 parts that sum to it exactly (_split at 8 bits; bfloat16 has
    fp32's exponent range, so no part overflows). Truncated, not rounded, as _mm16's weight parts:
    the interpreter's bfloat16 conversion truncates, so it gets the GPU's parts. Only where |a| <
    2**-110 may the last part need bits below bfloat16's smallest subnormal (2**-133): an error
    under 2**-133. Under the interpreter the parts stay in fp32 (its bfloat16 tl.dot returns
    garbage, see _mm16), the same values."""
    a0, a1, a2 = _split(a, False, -65536)
    dt = tl.float32 if INTERP else tl.bfloat16
    return a0.to(dt), a1.to(dt), a2.to(dt)


def _dot3(a, b0, b1, b2, acc):
    """acc + a @ (b0 + b1 + b2), chained through the tensor cores (fp32 accumulation), ``a`` taken
    in the parts' dtype: dW's product of bfloat16 x (exact) and _split_bf16's parts of dz, each
    product (8 x 8 significant bits) exact in fp32, as with tf32 parts. tf32 operands must be
    K-major, so dz's tf32 parts (K: pixels) went through shared memory transposed (Nsight
    Compute, streaming backward at cgm1 bf16: 8 STS a row at 16-way bank conflicts); bfloat16
    operands may be MN-major."""
    a = a.to(b0.dtype)
    acc = tl.dot(a, b0, acc)
    acc = tl.dot(a, b1, acc)
    return tl.dot(a, b2, acc)


def _mm(a0, a1, a2, b0, b1, b2, acc, A_EXACT: constexpr):
    """acc + (a0 + a1 + a2) @ (b0 + b1 + b2) in fp32 accuracy on tf32 tensor cores: products of
    tf32-exact parts are exact in fp32; the cross terms left out are below 2**-33 relative.
    The block's product starts from zero and is added to acc with one fp32 add: chaining acc
    through the tensor cores over every channel block (48 at C = 768) put cgm4 fp32 1.06x past
    the tolerance rule (H100)."""
    part = tl.dot(a0, b0, input_precision="tf32")
    part = tl.dot(a0, b1, part, input_precision="tf32")
    part = tl.dot(a0, b2, part, input_precision="tf32")
    if not A_EXACT:
        part = tl.dot(a1, b0, part, input_precision="tf32")
        part = tl.dot(a2, b0, part, input_precision="tf32")
        part = tl.dot(a1, b1, part, input_precision="tf32")
    return acc + part


def _mm16(x, w, acc, acc2, INTERP: constexpr):
    """(acc + x @ w0, acc2 + x @ (w1 + w2)) for 16-bit activations x (BP, BC) and fp32 weights w
    (BC, 32) split exactly as w = w0 + (w1 + w2) 2**-S, each part in x's dtype: every product is
    exact in fp32 (as _mm's tf32 parts) and x @ w = acc + acc2 2**-S (_taps_total). Why not tf32:
    wgmma takes tf32 operands K-major only, and channels-first x tiles are pixel-major, so Triton
    transposed them through shared memory (Nsight Compute, taps GEMM at cgm1 bf16: 81 % of its shared
    wavefronts excess, L1 88.8 % busy); 16-bit operands are read in either layout. Both sums are
    chained through the tensor cores over the channel blocks (fp32 accumulation; the fp32 path adds
    each block's product separately, see _mm), so no layout conversion sits in the loop.
    bfloat16 parts hold 8 significant bits (S = 8), float16 parts 11 (S = 11, tf32's truncation);
    w1 and w2 are scaled up by 2**S so float16's narrow range keeps w1 normal; w2 (2 bits, at 2**-22
    of w) may fall to a float16 subnormal for |w| < 2**-5, an error below 2**-35 absolute."""
    if x.dtype == tl.bfloat16:
        keep = -65536
        up = 256.0
    else:
        keep = -8192
        up = 2048.0
    w0 = (w.to(tl.int32, bitcast=True) & keep).to(tl.float32, bitcast=True)
    r = (w - w0) * up
    w1 = (r.to(tl.int32, bitcast=True) & keep).to(tl.float32, bitcast=True)
    # the same exact parts in fp32 under the interpreter: its bfloat16 tl.dot returns garbage
    # (Triton 3.6, CPU), and fp32 products of these parts are as exact (there x.dtype is fp32 after
    # the conversion, so the parts are not rounded to 16 bits again: only float16's subnormal w2
    # rounding, below 2**-35, is not reproduced)
    dt = tl.float32 if INTERP else x.dtype
    x = x.to(dt)
    acc = tl.dot(x, w0.to(x.dtype).to(dt), acc)
    acc2 = tl.dot(x, w1.to(x.dtype).to(dt), acc2)
    acc2 = tl.dot(x, (r - w1).to(x.dtype).to(dt), acc2)
    return acc, acc2


def _mm_half16(a0, a1, a2, b, acc, INTERP: constexpr):
    """acc + a @ b for results stored in 16 bits (dx of 16-bit activations): ``a`` as _split_bf16's
    parts (dz), the fp32 ``b`` (packed weights) split the same way, and the six products a_i b_j
    with i + j <= 2 on bfloat16 tensor cores (each exact in fp32), chained from zero and added to
    acc once, as in _mm. Truncated parts give |a1| < 2**-7 |a|, |a2| < 2**-14 |a|, so the three left
    out (a1 b2, a2 b1, a2 b2) are below 2**-20 + 2**-28 of |a| |b|, less than the tf32 parts' three
    left out before (a0 b2, a1 b1, a2 b0: up to 3 2**-20); dx's own rounding is 2**-9 (bf16) or
    2**-12 (fp16). No activation is an operand, so bfloat16's range (fp32's) serves float16 too."""
    b0, b1, b2 = _split_bf16(b, INTERP)
    part = tl.dot(a0, b0)
    part = tl.dot(a0, b1, part)
    part = tl.dot(a1, b0, part)
    part = tl.dot(a0, b2, part)
    part = tl.dot(a1, b1, part)
    part = tl.dot(a2, b0, part)
    return acc + part


def _taps_total(acc, acc2, x_ptr, X_EXACT: constexpr):
    """The taps product from _taps_loop's two sums (2**-S as in _mm16)."""
    if X_EXACT:
        if x_ptr.dtype.element_ty == tl.bfloat16:
            acc += acc2 * (1.0 / 256.0)
        else:
            acc += acc2 * (1.0 / 2048.0)
    return acc


def _wload(wa_ptr, wb_ptr, swa_c, swa_h, swa_w, swb_c, swb_h, swb_w, C, ch, mc, MOD: constexpr,
           TRANS: constexpr):
    """Packed weights of input channels ch of modality MOD in fp32: (BC, 32), or (32, BC) when
    TRANS. Column j = m * 16 + (dy + 1) * 4 + (dx + 1); zero where unused."""
    j = tl.arange(0, 32)
    m = j // 16
    ky = (j // 4) % 4
    kx = j % 4
    ok_j = (ky < 3) & (kx < 3)
    if TRANS:
        jj, cc, mm = j[:, None], ch[None, :], mc[None, :] & ok_j[:, None]
        m2, ky2, kx2 = m[:, None], ky[:, None], kx[:, None]
    else:
        jj, cc, mm = j[None, :], ch[:, None], mc[:, None] & ok_j[None, :]
        m2, ky2, kx2 = m[None, :], ky[None, :], kx[None, :]
    # w_m's input channel: X_m is the second half of cat([X_other, X_m])
    row = cc + C * (m2 == MOD).to(tl.int32)
    va = tl.load(wa_ptr + row * swa_c + ky2 * swa_h + kx2 * swa_w, mask=mm & (m2 == 0), other=0.0)
    vb = tl.load(wb_ptr + row * swb_c + ky2 * swb_h + kx2 * swb_w, mask=mm & (m2 == 1), other=0.0)
    return va.to(tl.float32) + vb.to(tl.float32)


def _taps_loop(base, sc, off, mp, wa_ptr, wb_ptr, swa_c, swa_h, swa_w, swb_c, swb_h, swb_w, C,
               acc, acc2, MOD: constexpr, X_EXACT: constexpr, INTERP: constexpr, BC: constexpr):
    """Both forwards' taps product over modality MOD's channels, for pixels at offsets ``off``
    (mask mp) from ``base``: 16-bit x into (acc, acc2) through _mm16, fp32 x into acc through _mm's
    tf32 parts. Each block's packed weights are gathered one block ahead, so their load latency
    hides behind the previous block's products (Nsight Compute: long-scoreboard stalls on those
    gathers were the taps GEMM's largest stall reason)."""
    ch = tl.arange(0, BC)
    w = _wload(wa_ptr, wb_ptr, swa_c, swa_h, swa_w, swb_c, swb_h, swb_w, C, ch, ch < C, MOD, False)
    for c0 in range(0, C, BC):
        ch = c0 + tl.arange(0, BC)
        x = tl.load(base + ch[None, :] * sc + off[:, None], mask=mp[:, None] & (ch < C)[None, :], other=0.0)
        nxt = ch + BC
        w_next = _wload(wa_ptr, wb_ptr, swa_c, swa_h, swa_w, swb_c, swb_h, swb_w, C, nxt, nxt < C, MOD, False)
        if X_EXACT:
            acc, acc2 = _mm16(x, w, acc, acc2, INTERP)
        else:
            x0, x1, x2 = _split(x.to(tl.float32), False)
            w0, w1, w2 = _split(w, False)
            acc = _mm(x0, x1, x2, w0, w1, w2, acc, False)
        w = w_next
    return acc, acc2


def _row_taps(xa_ptr, xb_ptr, wa_ptr, wb_ptr, b, r, C, H, wcol, in_cols,
              sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
              swa_c, swa_h, swa_w, swb_c, swb_h, swb_w,
              X_EXACT: constexpr, INTERP: constexpr, TWP: constexpr, BC: constexpr):
    """Row r's contribution to z: (TWP, 2, 4), [w, m, dy + 1] adds to z_m[r - dy, w]."""
    acc = tl.zeros((TWP, 32), dtype=tl.float32)
    acc2 = tl.zeros((TWP, 32), dtype=tl.float32)
    rok = (r >= 0) & (r < H)
    mp = in_cols & rok
    for MOD in tl.static_range(2):
        if MOD == 0:
            base = xa_ptr + b.to(tl.int64) * sxa_b + r * sxa_h
            sc, sw = sxa_c, sxa_w
        else:
            base = xb_ptr + b.to(tl.int64) * sxb_b + r * sxb_h
            sc, sw = sxb_c, sxb_w
        acc, acc2 = _taps_loop(base, sc, wcol * sw, mp, wa_ptr, wb_ptr, swa_c, swa_h, swa_w, swb_c, swb_h,
                               swb_w, C, acc, acc2, MOD, X_EXACT, INTERP, BC)
    acc = _taps_total(acc, acc2, xa_ptr, X_EXACT)
    # z_m[r - dy, w] gets P_r[w + dx, (m, dy, dx)]: shift each column by its dx, sum over dx
    i = tl.arange(0, TWP)
    j = tl.arange(0, 32)
    src = i[:, None] + (j % 4)[None, :] - 1
    ok = (src >= 0) & (src < TWP) & ((j % 4) < 3)[None, :]
    g = tl.where(ok, tl.gather(acc, tl.where(ok, src, 0), 0), 0.0)
    return tl.sum(tl.reshape(g, (TWP, 2, 4, 4)), axis=3)


def _pick(t3, k):
    """(TWP, 2) slice [:, :, k] of a (TWP, 2, 4) tensor."""
    kk = tl.arange(0, 4)
    return tl.sum(tl.where(kk[None, None, :] == k, t3, 0.0), axis=2)


def _col(t2, m):
    """Column m of a (TWP, 2) tensor."""
    return tl.sum(tl.where(tl.arange(0, 2)[None, :] == m, t2, 0.0), axis=1)


def _gate_rows(MOD: constexpr, b, h, xa_ptr, xb_ptr, ya_ptr, yb_ptr, ca_ptr, cb_ptr,
               sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
               sya_b, sya_c, sya_h, sya_w, syb_b, syb_c, syb_h, syb_w, sca_b, sca_c, scb_b, scb_c):
    """What gating row h of plane b in modality MOD reads and writes (both forward kernels):
    x's and y's row pointers, their channel and column strides, c's pointer and channel stride."""
    if MOD == 0:
        xrow = xa_ptr + b.to(tl.int64) * sxa_b + h * sxa_h
        yrow = ya_ptr + b.to(tl.int64) * sya_b + h * sya_h
        sc, sw, tc, tw = sxa_c, sxa_w, sya_c, sya_w
        c_base = ca_ptr + b * sca_b
        cs = sca_c
    else:
        xrow = xb_ptr + b.to(tl.int64) * sxb_b + h * sxb_h
        yrow = yb_ptr + b.to(tl.int64) * syb_b + h * syb_h
        sc, sw, tc, tw = sxb_c, sxb_w, syb_c, syb_w
        c_base = cb_ptr + b * scb_b
        cs = scb_c
    return xrow, yrow, sc, sw, tc, tw, c_base, cs


def _gate(c_base, cs, ch, mc, s_m, RESIDUAL: constexpr):
    """(pixels, channels): c_m[ch] s_m, + 1 when RESIDUAL (y = x gate; dx gets dy gate)."""
    gate = tl.load(c_base + ch * cs, mask=mc, other=0.0).to(tl.float32)[None, :] * s_m[:, None]
    if RESIDUAL:
        gate += 1.0
    return gate


def _dx_gate(gy, gate, dp_ptr, b, MOD: constexpr, C, ch, mc, HAS_DP: constexpr):
    """dx's elementwise part, dy_m gate_m; with HAS_DP (the fused module) plus the channel MLP's
    input gradient through GAP: dp (Bt, 2, 2C), [b, mlp, k] already / (H W), where X_MOD is input
    half 1 of its own MLP and half 0 of the other's."""
    dx_gate = gy * gate
    if HAS_DP:
        dpb = dp_ptr + b.to(tl.int64) * 4 * C
        dpv = tl.load(dpb + MOD * 2 * C + C + ch, mask=mc, other=0.0)
        dpv += tl.load(dpb + (1 - MOD) * 2 * C + ch, mask=mc, other=0.0)
        dx_gate += dpv[None, :]
    return dx_gate


def _dx_mm(d0, d1, d2, w, dx_gate, dx_ptr, X_EXACT: constexpr, INTERP: constexpr):
    """dx = dx_gate + dzs @ W_m^T, rounded as dx_ptr's dtype. d0..d2: dzs's exact parts, bfloat16
    ones for 16-bit activations (X_EXACT, _mm_half16), tf32 ones otherwise. The weight load stays
    with the callers, each at its own place in the channel loop (moving it changes their SASS)."""
    if X_EXACT:
        dx = _mm_half16(d0, d1, d2, w, dx_gate, INTERP)
    else:
        w0, w1, w2 = _split(w, False)
        dx = _mm(d0, d1, d2, w0, w1, w2, dx_gate, False)
    return _round_bf16(dx, dx_ptr, INTERP)


def _tile_cols(pid, n_strips, n_ct, LO, SR, H, W, TWP: constexpr, ONE_TILE: constexpr):
    """The program's plane b, rows [h0, h1), and columns: wcol = wb + i for i < TWP, the ones
    loaded (in the plane) and the ones it outputs (all when one tile spans the width; else the
    inner TWP - 2, the two outer ones being halo).
    ONE_TILE (config key "one_tile", only where one tile spans the width): wcol = i and the column
    mask i < W, which the compiler sees as constant over runs of 16 columns when W is a multiple of
    16: the loads vectorise, and Triton's pipeliner turns the channel loops' x/dy loads into
    cp.async copies num_stages - 1 blocks ahead (without it their 2-byte masked loads are neither)."""
    if ONE_TILE:
        strip = pid % n_strips
        b = pid // n_strips
        i = tl.arange(0, TWP)
        wcol = i
        in_cols = i < W
        out_cols = in_cols
    else:
        kt = pid % n_ct
        rest = pid // n_ct
        strip = rest % n_strips
        b = rest // n_strips
        i = tl.arange(0, TWP)
        wcol = kt * (TWP - 2) - LO + i
        in_cols = (wcol >= 0) & (wcol < W)
        out_cols = in_cols & (i >= LO) & (i < TWP - LO)
    h0 = strip * SR
    h1 = tl.minimum(h0 + SR, H)
    return b, h0, h1, wcol, in_cols, out_cols


def _cgm_fwd_kernel(xa_ptr, xb_ptr, ya_ptr, yb_ptr, s_ptr, ca_ptr, cb_ptr, wa_ptr, wb_ptr,
                    C, H, W, n_strips, n_ct, LO, SR,
                    sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
                    sya_b, sya_c, sya_h, sya_w, syb_b, syb_c, syb_h, syb_w,
                    sca_b, sca_c, scb_b, scb_c,
                    swa_c, swa_h, swa_w, swb_c, swb_h, swb_w,
                    RESIDUAL: constexpr, X_EXACT: constexpr, INTERP: constexpr,
                    TWP: constexpr, BC: constexpr, ONE_TILE: constexpr = False, GATE: constexpr = True):
    """GATE=False (config key "split"): s only; _cgm_apply_kernel gates every channel afterwards."""
    pid = tl.program_id(0)
    b, h0, h1, wcol, in_cols, out_cols = _tile_cols(pid, n_strips, n_ct, LO, SR, H, W, TWP, ONE_TILE)
    s_plane = s_ptr + b.to(tl.int64) * 2 * H * W
    mcol = tl.arange(0, 2)
    # z accumulators: za for the row to finish next, zb for the row after it
    t = _row_taps(xa_ptr, xb_ptr, wa_ptr, wb_ptr, b, h0 - 1, C, H, wcol, in_cols,
                  sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
                  swa_c, swa_h, swa_w, swb_c, swb_h, swb_w, X_EXACT, INTERP, TWP, BC)
    za = _pick(t, 0)
    t = _row_taps(xa_ptr, xb_ptr, wa_ptr, wb_ptr, b, h0, C, H, wcol, in_cols,
                  sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
                  swa_c, swa_h, swa_w, swb_c, swb_h, swb_w, X_EXACT, INTERP, TWP, BC)
    za += _pick(t, 1)
    zb = _pick(t, 0)
    for r in range(h0 + 1, h1 + 1):
        t = _row_taps(xa_ptr, xb_ptr, wa_ptr, wb_ptr, b, r, C, H, wcol, in_cols,
                      sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
                      swa_c, swa_h, swa_w, swb_c, swb_h, swb_w, X_EXACT, INTERP, TWP, BC)
        s = _sigmoid(za + _pick(t, 2), INTERP)     # (TWP, 2): row r - 1 is complete
        za = zb + _pick(t, 1)
        zb = _pick(t, 0)
        h = r - 1
        tl.store(s_plane + mcol[None, :] * H * W + h * W + wcol[:, None], s, mask=out_cols[:, None])
        for MOD in tl.static_range(2 if GATE else 0):
            xrow, yrow, sc, sw, tc, tw, c_base, cs = _gate_rows(
                MOD, b, h, xa_ptr, xb_ptr, ya_ptr, yb_ptr, ca_ptr, cb_ptr,
                sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
                sya_b, sya_c, sya_h, sya_w, syb_b, syb_c, syb_h, syb_w, sca_b, sca_c, scb_b, scb_c)
            s_m = _col(s, MOD)
            for c0 in range(0, C, BC):
                ch = c0 + tl.arange(0, BC)
                mc = ch < C
                msk = out_cols[:, None] & mc[None, :]
                gate = _gate(c_base, cs, ch, mc, s_m, RESIDUAL)
                x = tl.load(xrow + ch[None, :] * sc + wcol[:, None] * sw, mask=msk, other=0.0).to(tl.float32)
                y = _round_bf16(x * gate, ya_ptr, INTERP)
                tl.store(yrow + ch[None, :] * tc + wcol[:, None] * tw, y.to(ya_ptr.dtype.element_ty), mask=msk)


def _cgm_apply_kernel(xa_ptr, xb_ptr, ya_ptr, yb_ptr, s_ptr, ca_ptr, cb_ptr, C, H, W, n_wt,
                      sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
                      sya_b, sya_c, sya_h, sya_w, syb_b, syb_c, syb_h, syb_w,
                      sca_b, sca_c, scb_b, scb_c,
                      RESIDUAL: constexpr, INTERP: constexpr, TWA: constexpr, BCA: constexpr):
    """The split forward's second kernel (config key "split"): y_m = x_m (1 + c_m s_m) for a tile
    of BCA channels x TWA columns of one row, both modalities, from the s the first kernel wrote.
    No loop-carried state: every program's loads are independent (a pure stream)."""
    pid = tl.program_id(0)
    wt = pid % n_wt
    bh = pid // n_wt
    h = bh % H
    b = bh // H
    ch = tl.program_id(1) * BCA + tl.arange(0, BCA)
    mc = ch < C
    w = wt * TWA + tl.arange(0, TWA)
    mw = w < W
    msk = mc[:, None] & mw[None, :]
    for MOD in tl.static_range(2):
        xrow, yrow, sc, sw, tc, tw, c_base, cs = _gate_rows(
            MOD, b, h, xa_ptr, xb_ptr, ya_ptr, yb_ptr, ca_ptr, cb_ptr,
            sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
            sya_b, sya_c, sya_h, sya_w, syb_b, syb_c, syb_h, syb_w, sca_b, sca_c, scb_b, scb_c)
        s_m = tl.load(s_ptr + (b.to(tl.int64) * 2 + MOD) * H * W + h * W + w, mask=mw, other=0.0)
        gate = tl.load(c_base + ch * cs, mask=mc, other=0.0).to(tl.float32)[:, None] * s_m[None, :]
        if RESIDUAL:
            gate += 1.0
        x = tl.load(xrow + ch[:, None] * sc + w[None, :] * sw, mask=msk, other=0.0).to(tl.float32)
        y = _round_bf16(x * gate, ya_ptr, INTERP)
        tl.store(yrow + ch[:, None] * tc + w[None, :] * tw, y.to(ya_ptr.dtype.element_ty), mask=msk)


def _row_dz(g_ptr, x_ptr, s_plane, c_ptr, b, r, C, H, W, wcol, in_cols,
            sg_b, sg_c, sg_h, sg_w, sx_b, sx_c, sx_h, sx_w, sc_b, sc_c,
            MOD: constexpr, TWP: constexpr, BC: constexpr, EV: constexpr):
    """dz_m[r, w] = s (1 - s) sum_c c_m dy_m x_m of modality MOD (zero outside the plane).
    The products are summed per channel lane across the blocks and reduced over the lanes once:
    a reduction per block was a tenth of the backward's instructions. EV: the loads' L2 eviction
    policy (the row is read again one row later, when it is finished)."""
    mp = in_cols & (r >= 0) & (r < H)
    xrow = x_ptr + b.to(tl.int64) * sx_b + r * sx_h
    grow = g_ptr + b.to(tl.int64) * sg_b + r * sg_h
    acc = tl.zeros((TWP, BC), dtype=tl.float32)
    for c0 in range(0, C, BC):
        ch = c0 + tl.arange(0, BC)
        mc = ch < C
        msk = mp[:, None] & mc[None, :]
        cc = tl.load(c_ptr + b * sc_b + ch * sc_c, mask=mc, other=0.0).to(tl.float32)
        x = tl.load(xrow + ch[None, :] * sx_c + wcol[:, None] * sx_w, mask=msk, other=0.0,
                    eviction_policy=EV).to(tl.float32)
        gy = tl.load(grow + ch[None, :] * sg_c + wcol[:, None] * sg_w, mask=msk, other=0.0,
                     eviction_policy=EV).to(tl.float32)
        acc += gy * x * cc[None, :]
    s_m = tl.load(s_plane + MOD * H * W + r * W + wcol, mask=mp, other=0.0)
    return tl.sum(acc, axis=1) * s_m * (1.0 - s_m)


def _cgm_bwd_kernel(ga_ptr, gb_ptr, xa_ptr, xb_ptr, s_ptr, ca_ptr, cb_ptr, wa_ptr, wb_ptr,
                    dxa_ptr, dxb_ptr, dc_ptr, dw_ptr, dp_ptr,
                    C, H, W, n_strips, n_ct, LO, SR,
                    sga_b, sga_c, sga_h, sga_w, sgb_b, sgb_c, sgb_h, sgb_w,
                    sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
                    sda_b, sda_c, sda_h, sda_w, sdb_b, sdb_c, sdb_h, sdb_w,
                    sca_b, sca_c, scb_b, scb_c,
                    swa_c, swa_h, swa_w, swb_c, swb_h, swb_w,
                    RESIDUAL: constexpr, X_EXACT: constexpr, INTERP: constexpr, HAS_DP: constexpr,
                    TWP: constexpr, BC: constexpr, ONE_TILE: constexpr = False, BCZ: constexpr = 16,
                    EV1: constexpr = "", EV2: constexpr = ""):
    pid = tl.program_id(0)
    b, h0, h1, wcol, in_cols, out_cols = _tile_cols(pid, n_strips, n_ct, LO, SR, H, W, TWP, ONE_TILE)
    s_plane = s_ptr + b.to(tl.int64) * 2 * H * W
    X_BF16: constexpr = xa_ptr.dtype.element_ty == tl.bfloat16
    dw_prog = dw_ptr + pid.to(tl.int64) * 2 * 2 * C * 9  # its partial dW, [2 (map), 2C, 9]
    i = tl.arange(0, TWP)
    j = tl.arange(0, 32)
    jm = (j // 16)[None, :]
    jy = ((j // 4) % 4)[None, :]
    jx = (j % 4)[None, :]
    ok_j = (jy < 3) & (jx < 3)
    # dzs[w, (m, dy, dx)] = dz_m[h - dy, w - dx]: gather source column and its validity
    src = i[:, None] - jx + 1
    ok = ok_j & (src >= 0) & (src < TWP)
    src = tl.where(ok, src, 0)
    # dz rows h - 1 (p), h (q), h + 1 (n) for the row h being finished
    p0 = _row_dz(ga_ptr, xa_ptr, s_plane, ca_ptr, b, h0 - 1, C, H, W, wcol, in_cols, 
                 sga_b, sga_c, sga_h, sga_w, sxa_b, sxa_c, sxa_h, sxa_w, sca_b, sca_c, 0, TWP, BCZ, EV1)
    p1 = _row_dz(gb_ptr, xb_ptr, s_plane, cb_ptr, b, h0 - 1, C, H, W, wcol, in_cols, 
                 sgb_b, sgb_c, sgb_h, sgb_w, sxb_b, sxb_c, sxb_h, sxb_w, scb_b, scb_c, 1, TWP, BCZ, EV1)
    q0 = _row_dz(ga_ptr, xa_ptr, s_plane, ca_ptr, b, h0, C, H, W, wcol, in_cols, 
                 sga_b, sga_c, sga_h, sga_w, sxa_b, sxa_c, sxa_h, sxa_w, sca_b, sca_c, 0, TWP, BCZ, EV1)
    q1 = _row_dz(gb_ptr, xb_ptr, s_plane, cb_ptr, b, h0, C, H, W, wcol, in_cols, 
                 sgb_b, sgb_c, sgb_h, sgb_w, sxb_b, sxb_c, sxb_h, sxb_w, scb_b, scb_c, 1, TWP, BCZ, EV1)
    for r in range(h0 + 1, h1 + 1):
        n0 = _row_dz(ga_ptr, xa_ptr, s_plane, ca_ptr, b, r, C, H, W, wcol, in_cols, 
                 sga_b, sga_c, sga_h, sga_w, sxa_b, sxa_c, sxa_h, sxa_w, sca_b, sca_c, 0, TWP, BCZ, EV1)
        n1 = _row_dz(gb_ptr, xb_ptr, s_plane, cb_ptr, b, r, C, H, W, wcol, in_cols, 
                 sgb_b, sgb_c, sgb_h, sgb_w, sxb_b, sxb_c, sxb_h, sxb_w, scb_b, scb_c, 1, TWP, BCZ, EV1)
        h = r - 1
        d_n = tl.where(jm == 0, n0[:, None], n1[:, None])
        d_q = tl.where(jm == 0, q0[:, None], q1[:, None])
        d_p = tl.where(jm == 0, p0[:, None], p1[:, None])
        dsel = tl.where(jy == 0, d_n, tl.where(jy == 1, d_q, d_p))   # row h - dy
        dzs = tl.where(ok, tl.gather(dsel, src, 0), 0.0)              # column w - dx
        # dz's exact parts: bfloat16 ones for dx's product with 16-bit activations and for dW's with
        # bfloat16 x; tf32 ones for the rest. Not float16 parts for float16 x's dW: dz's range is
        # unbounded and x is an operand, so a float16 part of dz could overflow or underflow
        if X_EXACT:
            dh0, dh1, dh2 = _split_bf16(dzs, INTERP)
        if not X_BF16:
            dz0, dz1, dz2 = _split(dzs, False)
        not_first = h != h0
        for MOD in tl.static_range(2):
            if MOD == 0:
                xrow = xa_ptr + b.to(tl.int64) * sxa_b + h * sxa_h
                grow = ga_ptr + b.to(tl.int64) * sga_b + h * sga_h
                drow = dxa_ptr + b.to(tl.int64) * sda_b + h * sda_h
                sc, sw, gc, gw, dcs, dws = sxa_c, sxa_w, sga_c, sga_w, sda_c, sda_w
                c_base = ca_ptr + b * sca_b
                cs = sca_c
            else:
                xrow = xb_ptr + b.to(tl.int64) * sxb_b + h * sxb_h
                grow = gb_ptr + b.to(tl.int64) * sgb_b + h * sgb_h
                drow = dxb_ptr + b.to(tl.int64) * sdb_b + h * sdb_h
                sc, sw, gc, gw, dcs, dws = sxb_c, sxb_w, sgb_c, sgb_w, sdb_c, sdb_w
                c_base = cb_ptr + b * scb_b
                cs = scb_c
            s_m = tl.load(s_plane + MOD * H * W + h * W + wcol, mask=out_cols, other=0.0)
            for c0 in range(0, C, BC):
                ch = c0 + tl.arange(0, BC)
                mc = ch < C
                msk = out_cols[:, None] & mc[None, :]
                gate = _gate(c_base, cs, ch, mc, s_m, RESIDUAL)
                x = tl.load(xrow + ch[None, :] * sc + wcol[:, None] * sw, mask=msk, other=0.0, eviction_policy=EV2)
                gy = tl.load(grow + ch[None, :] * gc + wcol[:, None] * gw, mask=msk, other=0.0,
                             eviction_policy=EV2).to(tl.float32)
                w = _wload(wa_ptr, wb_ptr, swa_c, swa_h, swa_w, swb_c, swb_h, swb_w, C, ch, mc, MOD, True)
                dx_gate = _dx_gate(gy, gate, dp_ptr, b, MOD, C, ch, mc, HAS_DP)
                if X_EXACT:
                    dx = _dx_mm(dh0, dh1, dh2, w, dx_gate, dxa_ptr, X_EXACT, INTERP)
                else:
                    dx = _dx_mm(dz0, dz1, dz2, w, dx_gate, dxa_ptr, X_EXACT, INTERP)
                tl.store(drow + ch[None, :] * dcs + wcol[:, None] * dws, dx.to(dxa_ptr.dtype.element_ty), mask=msk,
                         eviction_policy=EV2)
                dw = tl.zeros((BC, 32), dtype=tl.float32)
                if X_BF16:
                    dw = _dot3(tl.trans(x), dh0, dh1, dh2, dw)
                else:
                    x0, x1, x2 = _split(tl.trans(x.to(tl.float32)), X_EXACT)
                    dw = _mm(x0, x1, x2, dz0, dz1, dz2, dw, X_EXACT)
                # packed (MOD, c, j) -> dW of map m = j // 16 at input channel c + C (MOD == m)
                wrow = ch[:, None] + C * (jm == MOD).to(tl.int32)
                w_ptrs = dw_prog + jm * (2 * C * 9) + wrow * 9 + jy * 3 + jx
                mw = mc[:, None] & ok_j
                # partial sums owned by this program, started by its first row (no zero fill)
                tl.store(w_ptrs, tl.load(w_ptrs, mask=mw & not_first, other=0.0) + dw, mask=mw)
                if not HAS_DP:  # with dp, the caller reduced dc beforehand (its MLP gave dp)
                    c_ptrs = dc_ptr + pid.to(tl.int64) * 2 * C + MOD * C + ch  # this program's [2, C]
                    dc = tl.sum(gy * x.to(tl.float32) * s_m[:, None], axis=0)
                    tl.store(c_ptrs, tl.load(c_ptrs, mask=mc & not_first, other=0.0) + dc, mask=mc)
        p0, p1, q0, q1 = q0, q1, n0, n1
        tl.debug_barrier()  # the partial sums' read-modify-writes of this row are done


_HELPERS = ("_trunc", "_split", "_split_bf16", "_dot3", "_mm", "_mm16", "_mm_half16", "_taps_total", "_wload",
            "_taps_loop", "_row_taps", "_pick", "_col", "_gate_rows", "_gate", "_dx_gate", "_dx_mm",
            "_tile_cols", "_row_dz")
_KERNELS = ("_cgm_fwd_kernel", "_cgm_apply_kernel", "_cgm_bwd_kernel")
_built: dict = {}


def _kernels() -> dict:
    return jit_module(globals(), _HELPERS + _KERNELS, _built)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# ptxas (sm_90, Triton 3.6) at cgm1 bf16: fwd BC 64 / 4 warps 255 registers + 744 B of spills,
# BC 32 / 8 warps 250 and none; bwd BC 32 / 4 warps 255 + 416 B, BC 16 / 8 warps 234 and none.
# One 8-warp program per SM at that size; --sweep in benchmarks/bench_cgm.py times the others.
# Timed (H100, cgm1 bf16, `bench_cgm.py --sweep`, 2026-11-27): fwd BC 16 / 4 warps 0.221 ms against
# 0.337 for BC 32 / 8 warps (programs_per_sm 1: 0.280, 4: 0.423); bwd BC 32 / 8 warps 0.626 ms
# against 0.688 for BC 16 (programs_per_sm 1: 0.647, 4: 0.743), although at cgm1 it takes 255
# registers and spills 56 B in bf16 (compile_offline had compiled 32 x 32 launches only; branch
# wip/cgm-variants adds the model's shapes and spill-free variants to time).
# fp32 inputs keep the earlier configurations (the sweep timed bf16): each channel block's product
# is one more fp32 add into z (see _mm), and with the new ones the whole-model rule test (fp32)
# missed on gradients it had passed (decoder 3.3 norm2.weight 1.04-1.23x, three runs).
# Then (H100, cgm1 bf16, faba63c, bench_cgm --sweep) the backward with the whole-width tile, BC 16 on
# 4 warps took 0.423 ms against 0.629 for BC 32 / 8 warps: two programs fit per SM in registers.
_DEFAULTS = {"fwd": dict(BC=16, num_warps=4, num_stages=2, programs_per_sm=2, max_tw=128),
             "bwd": dict(BC=16, num_warps=4, num_stages=2, programs_per_sm=2, max_tw=128, one_tile=True),
             "fwd_fp32": dict(BC=32, num_warps=8, num_stages=2, programs_per_sm=2, max_tw=128),
             "bwd_fp32": dict(BC=16, num_warps=8, num_stages=2, programs_per_sm=2, max_tw=128)}
CONFIG_OVERRIDE: dict = {}
# Launch variants (not defaults: each is a CONFIG_OVERRIDE that benchmarks/bench_cgm.py --sweep times
# and tests/ops/test_cgm_triton.py checks). Timed at cgm1 bf16 on the H100 (faba63c; forward default
# 0.223 ms, backward then BC 32 / 8 warps 0.629 ms): fwd_tile1 0.221, fwd_split 0.224,
# fwd_split_bc64 0.223, fwd_split_tw64 0.411; backward whole-width BC 16 on 8 warps 0.695, the same
# with num_stages 1 0.610, on 4 warps 0.423 (now the default). Registers: ptxas sm_90 (Triton 3.6, benchmarks/compile_offline.py) at cgm1 bf16 (TWP 128);
# none spills there. For reference, at cgm1 bf16 the defaults take fwd 234 registers and bwd 255
# + 56 B of stack (spills: the 32 x 32 launches compile_offline used to compile gave 202 / 236-240).
# At cgm1 the channel loops' x / dy loads are already cp.async-pipelined one block ahead (TTGIR);
# num_stages 3 spills in both kernels (fwd 255 + 24 B, bwd 255 + 208 B), so no deeper variant.
VARIANTS: dict = {
    # fwd: whole-width tile with the plain column mask i < W: 221 registers (default 234)
    "fwd_tile1": {"fwd": dict(one_tile=True)},
    # fwd in two kernels: s only (GATE=False, 233 registers), then _cgm_apply_kernel gates every
    # channel as a stream with no loop-carried state (BC 32 / 4 warps: 48 registers); x is read a
    # second time from HBM instead of L2 (6 n e bytes instead of 4 n e)
    "fwd_split": {"fwd": dict(one_tile=True, split=True)},
    # the same with 64-channel apply tiles and 8 warps (52 registers)
    "fwd_split_bc64": {"fwd": dict(one_tile=True, split=dict(BC=64, num_warps=8))},
    # the same with 64-column tiles (3 per 128-pixel row, 168 registers at cgm1: 3 programs per SM)
    "fwd_split_tw64": {"fwd": dict(split=True, max_tw=64, programs_per_sm=3)},
    # bwd: the earlier default, BC 32 on 8 warps (255 registers + 16 B of stack at cgm1 bf16; 56 B
    # before the bfloat16 backward products)
    "bwd_bc32_w8": {"bwd": dict(one_tile=False, BC=32, num_warps=8)},
    # the whole-width tile, BC 16 on 8 warps (240 registers): one program fills the register file
    "bwd_tile1_bc16_w8": {"bwd": dict(BC=16, num_warps=8)},
    # the same without the pipeliner (num_stages 1: no cp.async buffers, 241 registers)
    "bwd_tile1_bc16_w8_s1": {"bwd": dict(BC=16, num_warps=8, num_stages=1)},
    # GEMM form (triton_gemm.py; see the module docstring), not yet timed. Registers: ptxas sm_90
    # (Triton 3.6, compile_offline.py), the same at cgm1-cgm4 unless noted, bf16 / fp32; no launch
    # spills. Their tl.dots are wgmma, the loads of those loops cp.async-pipelined (TTGIR; the dz
    # kernel has no tl.dot and no pipelined loads).
    # fwd in three kernels: taps GEMM (BP 128 x BC 32, 4 warps, 3 stages) 169 / 243 registers,
    # shift-sum + sigmoid (256 pixels) 56, then _cgm_apply_kernel (BC 32 / 4 warps) 48
    "fwd_gemm": {"fwd": dict(gemm=True)},
    # taps GEMM on 256-pixel tiles, 8 warps: 172 / 240 (cgm4, one tile a plane: 177 / 249)
    "fwd_gemm_bp256_w8": {"fwd": dict(gemm=dict(BP=256, num_warps=8))},
    # taps GEMM on 16-channel blocks: 123 / 158 (4 programs per SM in bf16)
    "fwd_gemm_bc16": {"fwd": dict(gemm=dict(BC=16))},
    # fwd in two kernels (not yet timed): the taps GEMM (BC 16, as fwd_gemm_bc16), then shift-sum +
    # sigmoid + gating in one (triton_gemm._cgm_shift_apply_kernel: s from P per pixel tile, stored
    # by channel group 0 only; y and s bit for bit those of the three-launch GEMM forward in the CPU
    # tests, test_gpu_fused_apply_matches_three_launches checks the same at the stage shapes, not
    # yet run). Bytes at cgm1 bf16 (n e = 25.2 MB a modality, P 9.4 MB, s 1.05 MB), counting every
    # buffer as if it went through HBM: three launches move
    # x 2 x 50.3 + P 2 x 9.4 + s 2 x 1.05 + y 50.3 = 171.9 MB, fused 170.8 MB (s is not read back;
    # the count is 4 n e = 100.7 MB). What goes is one launch, the shift kernel's own pass
    # and its tail: x is still read twice, which only a haloed forward (the streaming kernel) avoids.
    # Registers (ptxas sm_90, Triton 3.6, compile_offline.py, cgm1-cgm4, 1-3 channel groups): the
    # fused kernel BP 128 x BC 32 on 4 warps 48-54 (bf16) / 56-64 (fp32), no spills; taps as fwd_gemm_bc16
    "fwd_gemm_bc16_fused": {"fwd": dict(gemm=dict(BC=16, fuse_apply=True))},
    # the same on 256-pixel tiles with 8 warps: 48-58 / 73-78
    "fwd_gemm_bc16_fused_bp256_w8": {"fwd": dict(gemm=dict(BC=16, fuse_apply=True,
                                                          apply=dict(BP=256, num_warps=8)))},
    # the same on 64-channel steps (twice the loads in flight per step): 71 / 96
    "fwd_gemm_bc16_fused_bc64": {"fwd": dict(gemm=dict(BC=16, fuse_apply=True, apply=dict(BC=64)))},
    # bwd in three kernels (BP 128 x BC 32, 4 warps, 3 stages): dz 96 / 124 (fused module, dp
    # given: 72 / 128), dx 152 / 232 (with dp 159 / 172), dW (BP 64 x BC 64) 128 / 252-255 (bf16 dx
    # 186 and dW 168-169 with tf32 parts of dz, before _mm_half16 and _dot3)
    "bwd_gemm": {"bwd": dict(gemm=True)},
    # 256-pixel tiles, 8 warps (dW too): dz 94-100 / 161-189, dx 152-160 / 208-218 (with dp
    # 145-166 / 254), dW 86 / 255
    "bwd_gemm_bp256_w8": {"bwd": dict(gemm=dict(BP=256, num_warps=8))},
    # 16-channel blocks, dW on 32-pixel tiles: dz 64 / 87, dx 86 / 146 (with dp 113 / 160),
    # dW 72-80 / 147-162
    "bwd_gemm_bc16": {"bwd": dict(gemm=dict(BC=16, dw=dict(BP=32)))},
    # dx's taps product as exact-split tensor-core products (the form's first dx) instead of the
    # default's 18 fp32 multiply-adds per element (triton_gemm._dx_taps_fma): they made dx the
    # slowest kernel of the form (H200, cgm1 bf16: dx 0.213 ms, dW 0.107, dz 0.047; profile_cgm.py)
    "bwd_gemm_dx_dots": {"bwd": dict(gemm=dict(dx_fma=False))},
    # dW on 32-channel tiles (the 16-bit default at cgm1's and cgm3's widths; _BY_WIDTH_16BIT)
    "bwd_gemm_dw_bc32": {"bwd": dict(gemm=dict(dw=dict(BC=32)))},
    # dW on 16-channel tiles (the 16-bit default at cgm2's width)
    "bwd_gemm_dw_bc16": {"bwd": dict(gemm=dict(dw=dict(BC=16)))},
    # dW BC 32 with the dz kernel's channel sums kept per lane (triton_gemm._cgm_dz_kernel LANES)
    # on 64-channel blocks (the 16-bit default at cgm3's width; cgm1's takes 32-channel blocks)
    "bwd_gemm_dz_lanes": {"bwd": dict(gemm=dict(dw=dict(BC=32), dz=dict(BC=64, lanes=True)))},
}
# The GEMM form's tiles (config key "gemm": True, or a dict overriding these): BP flattened pixels x
# BC channels per tl.dot; num_stages for the channel loops' pipelined loads; programs_per_sm sizes
# the dW kernel's chunks of pixel tiles. The shift-sum kernel takes tiles of _SHIFT_BP pixels.
# "fuse_apply" (forward): the shift-sum and the gating in one kernel (triton_gemm._cgm_shift_apply_kernel)
# on the tiles of "apply": BP pixels x BC channels per step, channel groups per pixel tile sized by
# programs_per_sm to fill the GPU ("groups" fixes their number). Its channel loop's loads are not
# software-pipelined at any num_stages (no tl.dot: plain 16-byte loads in the TTGIR, no cp.async);
# occupancy hides their latency (48-96 registers, several programs per SM).
# "dx_fma" (backward): dx's taps product as fp32 multiply-adds (triton_gemm._dx_taps_fma), not the
# exact-split tensor-core products (H200, bf16, profile_cgm.py, one call: the dx kernel at cgm1 0.211
# -> 0.059 ms, cgm2 0.096 -> 0.033; the form's pass at cgm2, its default width, 0.186 -> 0.123 ms).
_GEMM = {"fwd": dict(BP=128, BC=32, num_warps=4, num_stages=3, fuse_apply=False,
                     apply=dict(BP=128, BC=32, num_warps=4, num_stages=1, programs_per_sm=2)),
         "bwd": dict(BP=128, BC=32, num_warps=4, num_stages=3, dx_fma=True,
                     dw=dict(BP=64, BC=64, programs_per_sm=2))}
_SHIFT_BP = 256
_SMS: dict = {}


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# 16-bit inputs: the fastest launch of the per-case sweep by plane width, the widest first (H100,
# bf16). The GEMM forward needs pixel tiles to fill the GPU, so at 16 x 16 the streaming kernel on
# 32-channel blocks wins. Backward: bench_cgm.py --sweep-all at 3c0821f (ms, the default's in
# brackets); GPU-tested as defaults at f79b19a. Forward: the GEMM forms' sweep after the 16-bit
# taps product (3c23b23), kernels replayed from CUDA graphs at 9e2b8b7 (the earlier choice, BC 16
# on three launches, in brackets); every GEMM form is also GPU-tested as a launch variant.
#   cgm1 (W 128): fwd gemm BC 16 + fused shift/apply 0.0711 (0.0755); bwd num_stages 1 0.364 (0.416)
#   cgm2 (W 64):  fwd gemm BC 32 0.0403 (0.0427); bwd gemm 0.207 (0.320)
#   cgm3 (W 32):  fwd gemm BC 64 0.0348 (0.0437); bwd default 0.214
#   cgm4 (W 16):  fwd BC 32 / 8 warps 0.115 (0.150); bwd BC 32 0.179 (0.275)
# Streaming backward's dz pass (2748c0b, the same call as 0cf4e07 before it, graph-timed, H100): summed
# per lane and reduced once, on 32-channel blocks, its first read of a row kept in L2 (evict_last) and
# the second read and dx evict_first. An ncu profile at cgm1 had found the row's second read, one
# row-iteration (~44 MB of traffic) later, missing L2 (21 % hit rate; 316 MB from DRAM for 151 that
# must move). cgm1 0.336 -> 0.271 ms (without the hints 0.281, bcz 16 0.295), cgm3 0.205 -> 0.146,
# cgm4 0.167 -> 0.138, and with bcz 64 0.123.
# GEMM backward with 32-channel dW tiles (H200, bf16, bench_cgm.py --sweep-all, one call at 72ff913,
# the GEMM form's dx as fp32 multiply-adds): cgm1 0.181 ms against 0.255 for the streaming kernel
# above and 0.240 for the GEMM form's 64-channel dW tiles; cgm3 0.127 against 0.153 and 0.150.
# 16-channel dW tiles (later calls, H200): cgm2 bf16 0.116 ms against 0.119 at 32 and 0.133 at 64
# (cgm4 stays on the streaming kernel: 0.121 against 0.190); cgm1 bf16 0.185 against 0.181 at 32,
# cgm3 0.127 against 0.129 (fp16: 0.199 / 0.204, 0.128 / 0.134), so cgm1 and cgm3 keep 32.
# The dz kernel's channel sums per lane (config "dz", H200, bf16, one call at 1ad4fff, dW BC 32): cgm1
# 0.180 -> 0.168 ms on 32-channel blocks (0.175 on 64), cgm2 0.120 -> 0.109 on 64 (0.112 on 32), cgm3
# 0.127 -> 0.108 on 64 (0.116 on 32); 8 warps or 256-pixel tiles were slower.
_DZ32, _DZ64 = dict(lanes=True), dict(BC=64, lanes=True)
_BY_WIDTH_16BIT = ((128, {"fwd": dict(gemm=dict(BC=16, fuse_apply=True)), "bwd": dict(gemm=dict(dw=dict(BC=32), dz=_DZ32))}),
                   (64, {"fwd": dict(gemm=dict(BC=32)), "bwd": dict(gemm=dict(dw=dict(BC=16), dz=_DZ64))}),
                   (32, {"fwd": dict(gemm=dict(BC=64)), "bwd": dict(gemm=dict(dw=dict(BC=32), dz=_DZ64))}),
                   (0, {"fwd": dict(BC=32, num_warps=8), "bwd": dict(BC=32, evict=True, bcz=64)}))


def _options(kind, dtype, W=None):
    """Launch options: _DEFAULTS, then the per-width choice for 16-bit inputs, unless CONFIG_OVERRIDE
    (tests, --sweep) names this kind: then it applies on top of the defaults, in every dtype."""
    fp32 = dtype == torch.float32
    base = _DEFAULTS[kind + "_fp32" if fp32 else kind]
    if kind in CONFIG_OVERRIDE:
        return {**base, **CONFIG_OVERRIDE[kind]}
    if fp32 or W is None:
        return base
    return {**base, **next(t[kind] for w, t in _BY_WIDTH_16BIT if W >= w)}


def _slots(device, programs_per_sm):
    """Programs that fill the GPU; a few on the CPU (the interpreter; compile_offline.py's recording)."""
    if device.type != "cuda":
        return 4
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device] * programs_per_sm


def _config(kind, Bt, C, H, W, device, dtype=None):
    o = _options(kind, dtype, W)
    bc = max(16, min(o["BC"], _pow2(C)))  # tl.dot needs K >= 16
    if _pow2(W) <= o["max_tw"]:
        twp, n_ct = max(16, _pow2(W)), 1
    else:  # column tiles overlapping by the two halo columns
        twp = o["max_tw"]
        n_ct = -(-W // (twp - 2))
    slots = _slots(device, o["programs_per_sm"])
    # Strips of SR rows: enough programs to fill the GPU, each re-reading two halo rows
    rows = o.get("rows") or max(1, round(Bt * H * n_ct / slots))
    rows = min(rows, H)
    n_strips = -(-H // rows)
    return dict(TWP=twp, BC=bc, SR=rows, n_strips=n_strips, n_ct=n_ct, grid=(Bt * n_strips * n_ct,),
                num_warps=o["num_warps"], num_stages=o["num_stages"],
                # not at TWP 16 (cgm4): there the split forward's s-only kernel spilled 8 B (bf16)
                ONE_TILE=bool(o.get("one_tile")) and n_ct == 1 and twp >= 32,
                split=o.get("split") and _apply_config(o),
                # backward: the dz pass's channel block, its loads' L2 policy and the second read's
                BCZ=max(16, min(o.get("bcz", bc), _pow2(C))), EV1="evict_last" if o.get("evict") else "",
                EV2="evict_first" if o.get("evict") else "")


def _apply_config(o):
    """_cgm_apply_kernel's tiles: config key "split" (True or a dict of BC, num_warps)."""
    return {"BC": 32, "num_warps": 4, **(o["split"] if isinstance(o.get("split"), dict) else {})}


def _forward(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual):
    o = _options("fwd", x_ct.dtype, x_ct.shape[-1])
    if o.get("gemm"):
        return _forward_gemm(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual, o)
    k = _kernels()
    Bt, C, H, W = x_ct.shape
    cfg = _config("fwd", Bt, C, H, W, x_ct.device, x_ct.dtype)
    ya, yb = torch.empty_like(x_ct), torch.empty_like(x_pet)
    s = torch.empty((Bt, 2, H, W), dtype=torch.float32, device=x_ct.device)
    k["_cgm_fwd_kernel"][cfg["grid"]](
        x_ct, x_pet, ya, yb, s, c_ct, c_pet, w_ct, w_pet,
        C, H, W, cfg["n_strips"], cfg["n_ct"], int(cfg["n_ct"] > 1), cfg["SR"],
        *x_ct.stride(), *x_pet.stride(), *ya.stride(), *yb.stride(), *c_ct.stride(), *c_pet.stride(),
        *w_ct.stride()[1:], *w_pet.stride()[1:],
        RESIDUAL=residual, X_EXACT=x_ct.dtype != torch.float32, INTERP=interpreting(),
        TWP=cfg["TWP"], BC=cfg["BC"], ONE_TILE=cfg["ONE_TILE"], GATE=not cfg["split"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg["split"]:
        _apply(x_ct, x_pet, ya, yb, s, c_ct, c_pet, residual, cfg["split"])
    return ya, yb, s


def _apply(x_ct, x_pet, ya, yb, s, c_ct, c_pet, residual, acfg):
    """_cgm_apply_kernel: y from x, c and the s already written (split and GEMM forwards)."""
    Bt, C, H, W = x_ct.shape
    twa = min(_pow2(W), 128)
    bca = min(acfg["BC"], _pow2(C))
    n_wt = -(-W // twa)
    _kernels()["_cgm_apply_kernel"][(Bt * H * n_wt, -(-C // bca))](
        x_ct, x_pet, ya, yb, s, c_ct, c_pet, C, H, W, n_wt,
        *x_ct.stride(), *x_pet.stride(), *ya.stride(), *yb.stride(), *c_ct.stride(), *c_pet.stride(),
        RESIDUAL=residual, INTERP=interpreting(), TWA=twa, BCA=bca, num_warps=acfg["num_warps"])


def _backward_launch(g_ct, g_pet, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, residual, dp=None):
    """The backward kernel: (dx_ct, dx_pet, dc partials (nprog, 2, C) or None, dW partials
    (nprog, 2, 2C, 9)). With ``dp`` (Bt, 2, 2C) fp32, the fused CGM module's gradient through
    GAP, ``dp[b, 0, C + c] + dp[b, 1, c]`` is added to dx_ct[b, c] (and the mirror to dx_pet),
    and dc, which that caller reduced beforehand, is not computed."""
    ga, gb = g_ct.to(x_ct.dtype), g_pet.to(x_pet.dtype)
    o = _options("bwd", x_ct.dtype, x_ct.shape[-1])
    if o.get("gemm"):
        return _backward_gemm(ga, gb, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, residual, dp, o)
    k = _kernels()
    Bt, C, H, W = x_ct.shape
    cfg = _config("bwd", Bt, C, H, W, x_ct.device, x_ct.dtype)
    dev = x_ct.device
    dxa, dxb = torch.empty_like(x_ct), torch.empty_like(x_pet)
    nprog = cfg["grid"][0]
    dc = None if dp is not None else torch.empty((nprog, 2, C), dtype=torch.float32, device=dev)
    dw = torch.empty((nprog, 2, 2 * C, 9), dtype=torch.float32, device=dev)
    k["_cgm_bwd_kernel"][cfg["grid"]](
        ga, gb, x_ct, x_pet, s, c_ct, c_pet, w_ct, w_pet, dxa, dxb, dc, dw, dp,
        C, H, W, cfg["n_strips"], cfg["n_ct"], int(cfg["n_ct"] > 1), cfg["SR"],
        *ga.stride(), *gb.stride(), *x_ct.stride(), *x_pet.stride(), *dxa.stride(), *dxb.stride(),
        *c_ct.stride(), *c_pet.stride(), *w_ct.stride()[1:], *w_pet.stride()[1:],
        RESIDUAL=residual, X_EXACT=x_ct.dtype != torch.float32, INTERP=interpreting(),
        HAS_DP=dp is not None, TWP=cfg["TWP"], BC=cfg["BC"], ONE_TILE=cfg["ONE_TILE"], BCZ=cfg["BCZ"],
        EV1=cfg["EV1"], EV2=cfg["EV2"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dxa, dxb, dc, dw


def _gemm_config(kind, o, C, H, W):
    """The GEMM form's launch parameters: _GEMM[kind], overridden by config key "gemm" when it is a
    dict; the backward's "dw" (the dW kernel's) takes num_warps and num_stages from the others',
    its "dz" (the dz kernel's tiles and "lanes") all four of BP, BC, num_warps, num_stages."""
    user = o["gemm"] if isinstance(o["gemm"], dict) else {}
    g = {**_GEMM[kind], **user}
    if kind == "bwd":
        g["dw"] = _gemm_tiles({"num_warps": g["num_warps"], "num_stages": g["num_stages"],
                               **_GEMM["bwd"]["dw"], **user.get("dw", {})}, C, H, W)
        dz = {"BP": g["BP"], "BC": g["BC"], "num_warps": g["num_warps"], "num_stages": g["num_stages"],
              "lanes": False, **user.get("dz", {})}
        g["dz"] = _gemm_tiles(dz, C, H, W)
        g["dz"]["launch"]["LANES"] = bool(dz["lanes"])
    elif g["fuse_apply"]:
        g["apply"] = _gemm_tiles({**_GEMM["fwd"]["apply"], **user.get("apply", {})}, C, H, W)
    return _gemm_tiles(g, C, H, W)


def _gemm_tiles(g, C, H, W):
    """g with its pixel tiles per plane n_pt and its launch's keyword arguments (tl.dot: >= 16)."""
    bp, bc = max(16, min(g["BP"], _pow2(H * W))), max(16, min(g["BC"], _pow2(C)))
    return dict(g, n_pt=-(-(H * W) // bp),
                launch=dict(BP=bp, BC=bc, num_warps=g["num_warps"], num_stages=g["num_stages"]))


def _flat(*ts):
    """Every tensor's (h, w) strides merge into one pixel stride (triton_gemm._pix)."""
    return all(t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3) for t in ts)


def _forward_gemm(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual, o):
    """GEMM form (config key "gemm"): taps GEMM into P, shift-sum + sigmoid into s, then the gating
    kernel of the split forward; with "fuse_apply", the last two in one kernel (two launches)."""
    kg = triton_gemm._kernels()
    Bt, C, H, W = x_ct.shape
    g = _gemm_config("fwd", o, C, H, W)
    P = torch.empty((Bt, 18, H, W), dtype=torch.float32, device=x_ct.device)
    kg["_cgm_taps_kernel"][(Bt * g["n_pt"],)](
        x_ct, x_pet, w_ct, w_pet, P, C, H, W, g["n_pt"], *x_ct.stride(), *x_pet.stride(),
        *w_ct.stride()[1:], *w_pet.stride()[1:], X_EXACT=x_ct.dtype != torch.float32, INTERP=interpreting(),
        FLAT=_flat(x_ct, x_pet), **g["launch"])
    s = torch.empty((Bt, 2, H, W), dtype=torch.float32, device=x_ct.device)
    if g["fuse_apply"]:
        ya, yb = torch.empty_like(x_ct), torch.empty_like(x_pet)
        a = g["apply"]
        n_pt, bc = a["n_pt"], a["launch"]["BC"]
        n_cb = -(-C // bc)
        # channel groups per pixel tile: enough programs to fill the GPU (each recomputes s)
        n_cg = max(1, min(n_cb, a.get("groups") or round(_slots(x_ct.device, a["programs_per_sm"]) / (Bt * n_pt))))
        per = -(-n_cb // n_cg)      # channel blocks per group
        n_cg = -(-n_cb // per)
        kg["_cgm_shift_apply_kernel"][(Bt * n_pt * n_cg,)](
            x_ct, x_pet, ya, yb, P, s, c_ct, c_pet, C, H, W, n_pt, n_cg, per * bc,
            *x_ct.stride(), *x_pet.stride(), *ya.stride(), *yb.stride(), *c_ct.stride(), *c_pet.stride(),
            RESIDUAL=residual, INTERP=interpreting(), FLAT=_flat(x_ct, x_pet, ya, yb), **a["launch"])
        return ya, yb, s
    bps = max(16, min(_SHIFT_BP, _pow2(H * W)))
    n_ps = -(-(H * W) // bps)
    kg["_cgm_shift_kernel"][(Bt * n_ps,)](P, s, H, W, n_ps, INTERP=interpreting(), BP=bps, num_warps=4)
    ya, yb = torch.empty_like(x_ct), torch.empty_like(x_pet)
    _apply(x_ct, x_pet, ya, yb, s, c_ct, c_pet, residual, _apply_config(o))
    return ya, yb, s


def _backward_gemm(ga, gb, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, residual, dp, o):
    """GEMM form of _backward_launch (config key "gemm"), the same outputs; the dc partials are per
    pixel tile (Bt n_pt, 2, C), the dW partials per chunk of tiles (Bt n_chp, 2, 2C, 9), both
    plane-major as _backward's reduction expects."""
    kg = triton_gemm._kernels()
    Bt, C, H, W = x_ct.shape
    dev = x_ct.device
    g = _gemm_config("bwd", o, C, H, W)
    n_pt, launch, x_exact = g["n_pt"], g["launch"], x_ct.dtype != torch.float32
    dxa, dxb = torch.empty_like(x_ct), torch.empty_like(x_pet)
    dz = torch.empty((Bt, 2, H, W), dtype=torch.float32, device=dev)
    gz = g["dz"]   # the dz kernel's own tiles (config "dz"; by default the dx kernel's)
    dc = None if dp is not None else torch.empty((Bt * gz["n_pt"], 2, C), dtype=torch.float32, device=dev)
    kg["_cgm_dz_kernel"][(Bt * gz["n_pt"],)](
        ga, gb, x_ct, x_pet, s, c_ct, c_pet, dz, dc, C, H, W, gz["n_pt"],
        *ga.stride(), *gb.stride(), *x_ct.stride(), *x_pet.stride(), *c_ct.stride(), *c_pet.stride(),
        HAS_DC=dp is None, FLAT=_flat(ga, gb, x_ct, x_pet), **gz["launch"])
    kg["_cgm_dx_kernel"][(Bt * n_pt,)](
        ga, gb, dz, s, c_ct, c_pet, w_ct, w_pet, dxa, dxb, dp, C, H, W, n_pt,
        *ga.stride(), *gb.stride(), *dxa.stride(), *dxb.stride(), *c_ct.stride(), *c_pet.stride(),
        *w_ct.stride()[1:], *w_pet.stride()[1:], RESIDUAL=residual, X_EXACT=x_exact, INTERP=interpreting(),
        HAS_DP=dp is not None, FLAT=_flat(ga, gb, dxa, dxb), DX_FMA=bool(g["dx_fma"]), **launch)
    # dW: chunks of tpc pixel tiles of one plane x channel blocks, enough programs to fill the GPU
    gw = g["dw"]
    n_cb = -(-C // gw["launch"]["BC"])
    tpc = max(1, min(gw["n_pt"], round(Bt * gw["n_pt"] * n_cb / _slots(dev, gw["programs_per_sm"]))))
    n_chp = -(-gw["n_pt"] // tpc)
    dw = torch.empty((Bt * n_chp, 2, 2 * C, 9), dtype=torch.float32, device=dev)
    kg["_cgm_dw_kernel"][(Bt * n_chp, n_cb)](
        x_ct, x_pet, dz, dw, C, H, W, gw["n_pt"], n_chp, tpc, *x_ct.stride(), *x_pet.stride(),
        X_EXACT=x_exact, INTERP=interpreting(), FLAT=_flat(x_ct, x_pet), **gw["launch"])
    return dxa, dxb, dc, dw


def _backward(g_ct, g_pet, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, residual):
    dxa, dxb, dc, dw = _backward_launch(g_ct, g_pet, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, residual)
    Bt, C = x_ct.shape[:2]
    dc = dc.view(Bt, -1, 2, C).sum(1)
    dw = dw.sum(0)
    return (dxa, dxb, dc[:, 0].to(c_ct.dtype, copy=True), dc[:, 1].to(c_pet.dtype, copy=True),
            dw[0].view(w_ct.shape).to(w_ct.dtype, copy=True), dw[1].view(w_pet.shape).to(w_pet.dtype, copy=True))


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


class _EagerFn(torch.autograd.Function):
    """The same two kernels as the ops above, for eager mode: going through torch.library's
    custom-op dispatch costs host time on every call, and the CGM module is host-bound at these
    sizes (benchmarks/NOTES.md, "CGM kernel"). torch.compile traces the registered ops instead."""

    @staticmethod
    def forward(ctx, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual):
        y_ct, y_pet, s = _forward(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual)
        ctx.save_for_backward(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s)
        ctx.residual = residual
        return y_ct, y_pet

    @staticmethod
    def backward(ctx, g_ct, g_pet):
        x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s = ctx.saved_tensors
        # autograd materialises zeros for an output that was not used
        return (*_backward(g_ct, g_pet, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, ctx.residual), None)


def cgm_gate(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual=True):
    """Backend entry (arguments already validated by the public ``cgm_gate``): (y_ct, y_pet).

    float32/bfloat16/float16 activations run the kernels (math in fp32); float64 runs the
    reference, since the kernels compute in fp32. Differentiable in all six tensors.
    """
    if x_ct.dtype not in _DTYPES:
        return reference.cgm_gate(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual)
    if torch.compiler.is_compiling():
        y_ct, y_pet, _ = _fwd_op(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, bool(residual))
        return y_ct, y_pet
    return _EagerFn.apply(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, bool(residual))
