"""The whole CGM module in Triton launches: GAP of both inputs, both channel MLPs (conv1x1, BatchNorm
in train or eval mode, GELU, conv1x1, sigmoid) and the gate (``cgm_gate``'s kernels), forward and
backward, as one autograd node.

The plain module spends its time on the host: with the gate kernels, one forward + backward is
still 38 small ATen ops and 17 autograd nodes (benchmarks/count_cgm_ops.py), 2.6-4.1 ms eager
against 0.46-1.9 ms of device time on an H100 (benchmarks/NOTES.md, "CGM kernel"). Here a
forward is four launches (plane sums, two for the MLP, gate) and a backward four (plane sums of
dy x s, two for the MLP's backward, gate backward), in one autograd node.

  forward:  P[b, m, c, :]  = partial sums over H W of x_m            (_plane_sums_kernel)
            a_m = GELU(BN(W1 cat(p_other, p_m)))                      (_mlp_fwd_hid_kernel,
            per block of hidden units: BatchNorm's statistics are per unit over the batch, so
            each program holds the whole batch of its units and updates their running stats)
            c_m = sigmoid(W2 a_m + b2)                                (_mlp_fwd_out_kernel,
            per block of output channels)
            y = cgm_gate kernels                                      (triton._forward)
  backward: G[b, m, c, :] = partial sums over H W of dy_m x_m s_m = dc (_plane_sums_kernel)
            dh = dL/d(W1 cat(...)) through GELU and BN, dgamma, dbeta  (_mlp_bwd_hid_kernel,
            per block of hidden units; the reduction over C of W2^T dl in the program)
            dp = dL/dGAP / (H W) and dW1 per block of input channels,  (_mlp_bwd_in_kernel)
            dW2 and db2 per block of output channels, in one launch
            dx = gate's dx + dp, in the gate's backward kernel        (triton._backward_launch)

The MLP launches run on many programs, none reducing another's results: every reduction (over
the batch for BatchNorm and the weight gradients, over C for dh, over hidden for c and dp) sits
inside one program, in a fixed order, so the results are deterministic without atomics. The
MLPs used to run in one program each (two launches, one each way): on an H100 (bf16, fwd+bwd
from a CUDA graph, bench_cgm.py at f79b19a) that path was faster than the gate kernel with
PyTorch's MLP at C 96 and 192 but slower at C 384 (0.595 vs 0.438 ms) and 768 (1.168 vs 0.422),
where one SM ran an MLP whose cost grows as C^2 (W1 192 x 1536 at C 768).

dc is reduced in its own pass, not inside the gate's backward, because dx needs dp, which needs
dc over the whole plane; the pass reads dy and x once, the bytes the autograd path spends adding
the GAP gradient to dx afterwards, and leaves dx rounded once.

The plane sums add fp32 within a tile and float64 across tiles (float64 partials); the MLPs run
in float64 (fp32 parameters widened on load, fp64 MMAs, BatchNorm's statistics and backward in
fp64), rounding c, the running stats and every gradient to fp32 once. In fp32 the MLP's error
was up to 3.4x the fp32 reference's on an H100 (cgm4, grad of W1); the running stats follow
``nn.BatchNorm2d`` (momentum update, unbiased variance, ``num_batches_tracked`` + 1).
The module falls back to PyTorch (``supported`` says why) for SyncBatchNorm, momentum=None, no
affine or no running stats, non-fp32 parameters, and under torch.compile.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import triton as gate
from .. import _backend
from .._triton_env import interpreting
from .._triton_math import jit_module

# triton.language and its constexpr, bound by _kernels() on first use (as in .triton)
tl = constexpr = None


def _pooled(P_ptr, rb, mb, k, mk, C, NS, inv_hw, MOD: constexpr):
    """cat([p_other, p_MOD])[b, k] for rows rb and input channels k: (BB, BK) float64 from the
    float64 partial sums P (Bt, 2, C, NS); inv_hw a float64 scalar."""
    src = tl.where(k < C, 1 - MOD, MOD)
    ch = tl.where(k < C, k, k - C)
    base = P_ptr + ((rb[:, None] * 2 + src[None, :]) * C + ch[None, :]) * NS
    msk = mb[:, None] & mk[None, :]
    f = tl.load(base, mask=msk, other=0.0)
    for sp in range(1, NS):
        f += tl.load(base + sp, mask=msk, other=0.0)
    return f * inv_hw


def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


def _plane_sums_kernel(xa_ptr, xb_ptr, ga_ptr, gb_ptr, s_ptr, out_ptr, C, H, W, NS, PCH,
                       sxa_b, sxa_c, sxa_h, sxa_w, sxb_b, sxb_c, sxb_h, sxb_w,
                       sga_b, sga_c, sga_h, sga_w, sgb_b, sgb_c, sgb_h, sgb_w,
                       GRAD: constexpr, FLAT: constexpr, BC: constexpr, BP: constexpr):
    """out[b, m, c, sp] = sum over pixels [sp PCH, (sp + 1) PCH) of x_m (GRAD: of dy_m x_m s_m).
    FLAT: every tensor's (h, w) strides merge into one pixel stride (s_h = W s_w), so the pixel
    offset needs no division."""
    b = tl.program_id(0)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    sp = tl.program_id(2)
    mc = ch < C
    HW = H * W
    p_end = tl.minimum(sp * PCH + PCH, HW)
    for MOD in tl.static_range(2):
        if MOD == 0:
            xbase = xa_ptr + b.to(tl.int64) * sxa_b
            gbase = ga_ptr + b.to(tl.int64) * sga_b
            sc, sh, sw, gc, gh, gw = sxa_c, sxa_h, sxa_w, sga_c, sga_h, sga_w
        else:
            xbase = xb_ptr + b.to(tl.int64) * sxb_b
            gbase = gb_ptr + b.to(tl.int64) * sgb_b
            sc, sh, sw, gc, gh, gw = sxb_c, sxb_h, sxb_w, sgb_c, sgb_h, sgb_w
        acc = tl.zeros((BC, BP), dtype=tl.float32)
        for p0 in range(sp * PCH, p_end, BP):
            p = p0 + tl.arange(0, BP)
            mp = p < p_end
            if FLAT:
                px = p * sw
                pg = p * gw
            else:
                px = (p // W) * sh + (p % W) * sw
                pg = (p // W) * gh + (p % W) * gw
            msk = mc[:, None] & mp[None, :]
            v = tl.load(xbase + ch[:, None] * sc + px[None, :], mask=msk, other=0.0).to(tl.float32)
            if GRAD:
                g = tl.load(gbase + ch[:, None] * gc + pg[None, :], mask=msk, other=0.0).to(tl.float32)
                s = tl.load(s_ptr + (b.to(tl.int64) * 2 + MOD) * HW + p, mask=mp, other=0.0)
                v = v * g * s[None, :]
            acc += v
        # fp32 within the tile (<= PCH / BP terms per lane, then a tree over BP), fp64 across
        # tiles and splits: the partials are float64 and their readers add them in float64
        tl.store(out_ptr + ((b * 2 + MOD) * C + ch) * NS + sp, tl.sum(acc, axis=1).to(tl.float64), mask=mc)


def _dl(G_ptr, NSG, c_ptr, rb, mb, cc, mc, C, MOD: constexpr):
    """dL/d(the second conv's output) for rows rb and channels cc of MLP MOD: dc c (1 - c), dc the
    float64 sum of G's NSG partials; (BB, BC) float64, zero outside mb x mc."""
    mbc = mb[:, None] & mc[None, :]
    gbase = G_ptr + ((rb[:, None] * 2 + MOD) * C + cc[None, :]) * NSG
    dc = tl.load(gbase, mask=mbc, other=0.0)
    for sp in range(1, NSG):
        dc += tl.load(gbase + sp, mask=mbc, other=0.0)
    cv = tl.load(c_ptr + (rb[:, None] * 2 + MOD) * C + cc[None, :], mask=mbc, other=0.0).to(tl.float64)
    return dc * cv * (1.0 - cv)


def _mlp_fwd_hid_one(P_ptr, h_ptr, a_ptr, st_ptr, w1_ptr, gam_ptr, bet_ptr, rm_ptr, rv_ptr, nbt_ptr,
                     Bt, C, HID, NS, HW, momentum, eps,
                     MOD: constexpr, TRAIN: constexpr, BB: constexpr, BH: constexpr, BK: constexpr):
    # float64 throughout (fp32 parameters widened on load, results rounded once when stored):
    # the products are fp64 MMAs (DMMA on sm_80+), BatchNorm's statistics fp64. BatchNorm's
    # statistics are per hidden unit over the batch, so a block of hidden units needs no other's.
    inv_hw = 1.0 / tl.cast(HW, tl.float64)
    hb = tl.program_id(0)
    rb = tl.arange(0, BB)
    mb = rb < Bt
    j = hb * BH + tl.arange(0, BH)
    mj = j < HID
    h = tl.zeros((BB, BH), dtype=tl.float64)
    for k0 in range(0, 2 * C, BK):
        k = k0 + tl.arange(0, BK)
        mk = k < 2 * C
        f = _pooled(P_ptr, rb, mb, k, mk, C, NS, inv_hw, MOD)
        w1t = tl.load(w1_ptr + j[None, :] * (2 * C) + k[:, None], mask=mk[:, None] & mj[None, :], other=0.0)
        h = tl.dot(f, w1t.to(tl.float64), h, out_dtype=tl.float64)
    rm = tl.load(rm_ptr + j, mask=mj, other=0.0).to(tl.float64)
    rv = tl.load(rv_ptr + j, mask=mj, other=1.0).to(tl.float64)
    if TRAIN:
        nb = tl.cast(Bt, tl.float64)
        mean = tl.sum(tl.where(mb[:, None], h, 0.0), axis=0) / nb
        d = tl.where(mb[:, None], h - mean[None, :], 0.0)
        var = tl.sum(d * d, axis=0) / nb
        unbias = nb / tl.maximum(nb - 1.0, 1.0)
        tl.store(rm_ptr + j, (1.0 - momentum) * rm + momentum * mean, mask=mj)
        tl.store(rv_ptr + j, (1.0 - momentum) * rv + momentum * (var * unbias), mask=mj)
        if hb == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
    else:
        mean = rm
        var = rv
    rstd = 1.0 / tl.sqrt(var + eps)          # fp64 sqrt and division round to nearest
    gam = tl.load(gam_ptr + j, mask=mj, other=0.0).to(tl.float64)
    bet = tl.load(bet_ptr + j, mask=mj, other=0.0).to(tl.float64)
    a = _gelu((h - mean[None, :]) * (rstd * gam)[None, :] + bet[None, :])
    # float64, for the second conv and the backward: h before BN and a = GELU(BN(h)) (Bt, 2, HID),
    # mean and rstd (2, 2, HID)
    ok = mb[:, None] & mj[None, :]
    tl.store(h_ptr + (rb[:, None] * 2 + MOD) * HID + j[None, :], h, mask=ok)
    tl.store(a_ptr + (rb[:, None] * 2 + MOD) * HID + j[None, :], a, mask=ok)
    tl.store(st_ptr + MOD * 2 * HID + j, mean, mask=mj)
    tl.store(st_ptr + (MOD * 2 + 1) * HID + j, rstd, mask=mj)


def _mlp_fwd_hid_kernel(P_ptr, h_ptr, a_ptr, st_ptr,
                        w1a_ptr, gama_ptr, beta_ptr, rma_ptr, rva_ptr, nba_ptr,
                        w1b_ptr, gamb_ptr, betb_ptr, rmb_ptr, rvb_ptr, nbb_ptr,
                        Bt, C, HID, NS, HW, momentum, eps,
                        TRAIN: constexpr, BB: constexpr, BH: constexpr, BK: constexpr):
    """Program (i, m): hidden units [i BH, (i + 1) BH) of MLP m (0: CT's gate on cat(p_pet, p_ct),
    1: PET's on cat(p_ct, p_pet)) for the whole batch: the first conv, BatchNorm (and its running
    stats; num_batches_tracked by i = 0), GELU. W1 is the contiguous conv weight (HID, 2C)."""
    if tl.program_id(1) == 0:
        _mlp_fwd_hid_one(P_ptr, h_ptr, a_ptr, st_ptr, w1a_ptr, gama_ptr, beta_ptr, rma_ptr, rva_ptr, nba_ptr,
                         Bt, C, HID, NS, HW, momentum, eps, 0, TRAIN, BB, BH, BK)
    else:
        _mlp_fwd_hid_one(P_ptr, h_ptr, a_ptr, st_ptr, w1b_ptr, gamb_ptr, betb_ptr, rmb_ptr, rvb_ptr, nbb_ptr,
                         Bt, C, HID, NS, HW, momentum, eps, 1, TRAIN, BB, BH, BK)


def _mlp_fwd_out_one(a_ptr, c_ptr, w2_ptr, b2_ptr, Bt, C, HID,
                     MOD: constexpr, BB: constexpr, BC: constexpr, BKH: constexpr):
    rb = tl.arange(0, BB)
    mb = rb < Bt
    cc = tl.program_id(0) * BC + tl.arange(0, BC)
    mc = cc < C
    o = tl.zeros((BB, BC), dtype=tl.float64)
    for j0 in range(0, HID, BKH):
        j = j0 + tl.arange(0, BKH)
        mj = j < HID
        a = tl.load(a_ptr + (rb[:, None] * 2 + MOD) * HID + j[None, :], mask=mb[:, None] & mj[None, :], other=0.0)
        w2t = tl.load(w2_ptr + cc[None, :] * HID + j[:, None], mask=mj[:, None] & mc[None, :], other=0.0)
        o = tl.dot(a, w2t.to(tl.float64), o, out_dtype=tl.float64)
    b2 = tl.load(b2_ptr + cc, mask=mc, other=0.0).to(tl.float64)
    tl.store(c_ptr + (rb[:, None] * 2 + MOD) * C + cc[None, :], tl.sigmoid(o + b2[None, :]),
             mask=mb[:, None] & mc[None, :])


def _mlp_fwd_out_kernel(a_ptr, c_ptr, w2a_ptr, b2a_ptr, w2b_ptr, b2b_ptr, Bt, C, HID,
                        BB: constexpr, BC: constexpr, BKH: constexpr):
    """Program (i, m): c[:, m, i BC:(i + 1) BC] = sigmoid(a_m W2_m^T + b2_m) for channels
    [i BC, (i + 1) BC); W2 is the contiguous conv weight (C, HID)."""
    if tl.program_id(1) == 0:
        _mlp_fwd_out_one(a_ptr, c_ptr, w2a_ptr, b2a_ptr, Bt, C, HID, 0, BB, BC, BKH)
    else:
        _mlp_fwd_out_one(a_ptr, c_ptr, w2b_ptr, b2b_ptr, Bt, C, HID, 1, BB, BC, BKH)


def _mlp_bwd_hid_one(G_ptr, NSG, c_ptr, h_ptr, st_ptr, dh_ptr, w2_ptr, gam_ptr, bet_ptr, dgam_ptr, dbet_ptr,
                     Bt, C, HID, MOD: constexpr, TRAIN: constexpr, BB: constexpr, BH: constexpr,
                     BC: constexpr):
    # float64 as in the forward: G, h, mean, rstd are float64, the parameters widened on load,
    # every gradient rounded to fp32 once when stored; dh kept in float64 for the next launch
    rb = tl.arange(0, BB)
    mb = rb < Bt
    j = tl.program_id(0) * BH + tl.arange(0, BH)
    mj = j < HID
    ok = mb[:, None] & mj[None, :]
    da = tl.zeros((BB, BH), dtype=tl.float64)
    for c0 in range(0, C, BC):     # da = dl W2[:, block], the reduction over C in this program
        cc = c0 + tl.arange(0, BC)
        mc = cc < C
        dl = _dl(G_ptr, NSG, c_ptr, rb, mb, cc, mc, C, MOD)                  # (BB, BC)
        w2 = tl.load(w2_ptr + cc[:, None] * HID + j[None, :], mask=mc[:, None] & mj[None, :], other=0.0)
        da = tl.dot(dl, w2.to(tl.float64), da, out_dtype=tl.float64)
    h = tl.load(h_ptr + (rb[:, None] * 2 + MOD) * HID + j[None, :], mask=ok, other=0.0)
    mean = tl.load(st_ptr + MOD * 2 * HID + j, mask=mj, other=0.0)
    rstd = tl.load(st_ptr + (MOD * 2 + 1) * HID + j, mask=mj, other=0.0)
    gam = tl.load(gam_ptr + j, mask=mj, other=0.0).to(tl.float64)
    bet = tl.load(bet_ptr + j, mask=mj, other=0.0).to(tl.float64)
    xhat = tl.where(ok, (h - mean[None, :]) * rstd[None, :], 0.0)
    # GELU (erf form): d/dx = Phi(x) + x phi(x)
    hn = xhat * gam[None, :] + bet[None, :]
    dgelu = 0.5 * (1.0 + tl.math.erf(hn * 0.7071067811865476)) + hn * tl.exp(-0.5 * hn * hn) * 0.3989422804014327
    dhn = tl.where(ok, da * dgelu, 0.0)
    tl.store(dbet_ptr + j, tl.sum(dhn, axis=0), mask=mj)
    tl.store(dgam_ptr + j, tl.sum(dhn * xhat, axis=0), mask=mj)
    dxh = dhn * gam[None, :]
    if TRAIN:  # batch statistics: dh = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
        mdx = tl.sum(dxh, axis=0) / tl.cast(Bt, tl.float64)
        mdxx = tl.sum(dxh * xhat, axis=0) / tl.cast(Bt, tl.float64)
        dh = rstd[None, :] * (dxh - mdx[None, :] - xhat * mdxx[None, :])
    else:
        dh = dxh * rstd[None, :]
    tl.store(dh_ptr + (rb[:, None] * 2 + MOD) * HID + j[None, :], dh, mask=ok)


def _mlp_bwd_hid_kernel(G_ptr, NSG, c_ptr, h_ptr, st_ptr, dh_ptr,
                        w2a_ptr, gama_ptr, beta_ptr, w2b_ptr, gamb_ptr, betb_ptr,
                        dgama_ptr, dbeta_ptr, dgamb_ptr, dbetb_ptr, Bt, C, HID,
                        TRAIN: constexpr, BB: constexpr, BH: constexpr, BC: constexpr):
    """Program (i, m), hidden units [i BH, (i + 1) BH) of MLP m: from dc = G summed over its NSG
    partials, the gradient at the first conv's output dh (float64, (Bt, 2, HID)) through GELU and
    BatchNorm, and BatchNorm's dgamma, dbeta."""
    if tl.program_id(1) == 0:
        _mlp_bwd_hid_one(G_ptr, NSG, c_ptr, h_ptr, st_ptr, dh_ptr, w2a_ptr, gama_ptr, beta_ptr, dgama_ptr,
                         dbeta_ptr, Bt, C, HID, 0, TRAIN, BB, BH, BC)
    else:
        _mlp_bwd_hid_one(G_ptr, NSG, c_ptr, h_ptr, st_ptr, dh_ptr, w2b_ptr, gamb_ptr, betb_ptr, dgamb_ptr,
                         dbetb_ptr, Bt, C, HID, 1, TRAIN, BB, BH, BC)


def _mlp_bwd_in_one(G_ptr, NSG, P_ptr, NS, c_ptr, a_ptr, dh_ptr, dF_ptr, w1_ptr, dw1_ptr, dw2_ptr, db2_ptr,
                    Bt, C, HID, HW, NKB, MOD: constexpr, BB: constexpr, BK: constexpr, BC: constexpr,
                    BKH: constexpr):
    rb = tl.arange(0, BB)
    mb = rb < Bt
    pid = tl.program_id(0)
    if pid < NKB:  # input channels [pid BK, (pid + 1) BK): dF = dh W1 / (H W), dW1 = dh^T f
        inv_hw = 1.0 / tl.cast(HW, tl.float64)
        k = pid * BK + tl.arange(0, BK)
        mk = k < 2 * C
        f = _pooled(P_ptr, rb, mb, k, mk, C, NS, inv_hw, MOD)               # (BB, BK)
        df = tl.zeros((BB, BK), dtype=tl.float64)
        for j0 in range(0, HID, BKH):
            j = j0 + tl.arange(0, BKH)
            mj = j < HID
            mjk = mj[:, None] & mk[None, :]
            dh = tl.load(dh_ptr + (rb[:, None] * 2 + MOD) * HID + j[None, :], mask=mb[:, None] & mj[None, :],
                         other=0.0)
            w1 = tl.load(w1_ptr + j[:, None] * (2 * C) + k[None, :], mask=mjk, other=0.0)
            df = tl.dot(dh, w1.to(tl.float64), df, out_dtype=tl.float64)
            dw1 = tl.dot(tl.trans(dh), f, out_dtype=tl.float64)                # (BKH, BK)
            tl.store(dw1_ptr + j[:, None] * (2 * C) + k[None, :], dw1, mask=mjk)
        tl.store(dF_ptr + (rb[:, None] * 2 + MOD) * (2 * C) + k[None, :], df * inv_hw,
                 mask=mb[:, None] & mk[None, :])
    else:          # output channels [(pid - NKB) BC, ...): dW2 = dl^T a, db2 = sum of dl over the batch
        cc = (pid - NKB) * BC + tl.arange(0, BC)
        mc = cc < C
        dl = _dl(G_ptr, NSG, c_ptr, rb, mb, cc, mc, C, MOD)                  # (BB, BC)
        tl.store(db2_ptr + cc, tl.sum(dl, axis=0), mask=mc)
        for j0 in range(0, HID, BKH):
            j = j0 + tl.arange(0, BKH)
            mj = j < HID
            a = tl.load(a_ptr + (rb[:, None] * 2 + MOD) * HID + j[None, :], mask=mb[:, None] & mj[None, :],
                        other=0.0)
            dw2 = tl.dot(tl.trans(dl), a, out_dtype=tl.float64)               # (BC, BKH)
            tl.store(dw2_ptr + cc[:, None] * HID + j[None, :], dw2, mask=mc[:, None] & mj[None, :])


def _mlp_bwd_in_kernel(G_ptr, NSG, P_ptr, NS, c_ptr, a_ptr, dh_ptr, dF_ptr, w1a_ptr, w1b_ptr,
                       dw1a_ptr, dw2a_ptr, db2a_ptr, dw1b_ptr, dw2b_ptr, db2b_ptr, Bt, C, HID, HW, NKB,
                       BB: constexpr, BK: constexpr, BC: constexpr, BKH: constexpr):
    """Program (i, m) of MLP m: for i < NKB, input channels [i BK, (i + 1) BK) of cat(...):
    dF[b, m, k] = dL/d cat(...)[b, k] / (H W) for the gate's backward to add to dx, and those
    columns of dW1; for i >= NKB, output channels [(i - NKB) BC, ...): those rows of dW2 and b2."""
    if tl.program_id(1) == 0:
        _mlp_bwd_in_one(G_ptr, NSG, P_ptr, NS, c_ptr, a_ptr, dh_ptr, dF_ptr, w1a_ptr, dw1a_ptr, dw2a_ptr,
                        db2a_ptr, Bt, C, HID, HW, NKB, 0, BB, BK, BC, BKH)
    else:
        _mlp_bwd_in_one(G_ptr, NSG, P_ptr, NS, c_ptr, a_ptr, dh_ptr, dF_ptr, w1b_ptr, dw1b_ptr, dw2b_ptr,
                        db2b_ptr, Bt, C, HID, HW, NKB, 1, BB, BK, BC, BKH)


_HELPERS = ("_pooled", "_gelu", "_dl", "_mlp_fwd_hid_one", "_mlp_fwd_out_one", "_mlp_bwd_hid_one",
            "_mlp_bwd_in_one")
_KERNELS = ("_plane_sums_kernel", "_mlp_fwd_hid_kernel", "_mlp_fwd_out_kernel", "_mlp_bwd_hid_kernel",
            "_mlp_bwd_in_kernel")
_built: dict = {}


def _kernels() -> dict:
    return jit_module(globals(), _HELPERS + _KERNELS, _built)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# Not yet timed on a GPU: plane sums with 4 programs per SM (a pure read stream), tiles of
# 16 channels x 128 pixels, 4 warps (ptxas sm_90: 212 registers for the fp32 dy x s sum with
# 256-pixel tiles and a division per pixel).
_SUMS = dict(BC=16, BP=128, num_warps=4, programs_per_sm=4)
# The MLP launches (not yet timed on a GPU): blocks of 16 hidden units (the fp64 MMA's smallest
# tile: the most programs, 2 x 12 at cgm4's hidden 192) and of 16 output channels; the reduction
# chunks hold BB x TILE / BB values (64 at the batch tile 16, 16 at 64) in 4 warps.
_MLP = dict(BH=16, BC=16, BK_IN=32, TILE=1024, num_warps=4)
MAX_BB = 64  # the MLP kernels keep the whole (padded) batch in each program


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _sums_config(Bt, C, H, W, device):
    HW = H * W
    bc = min(_SUMS["BC"], max(2, _pow2(C)))
    n_cb = -(-C // bc)
    if interpreting():  # tests: small tiles, two pixel splits, so the partial sums are tested
        bp = 16
        ns = min(2, -(-HW // bp))
    else:
        bp = min(_SUMS["BP"], max(16, _pow2(HW)))
        if device.type == "cuda":
            if device not in gate._SMS:
                gate._SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
            slots = gate._SMS[device] * _SUMS["programs_per_sm"]
        else:
            slots = 4  # compile_offline.py records the GPU's launches on CPU tensors
        ns = max(1, min(-(-HW // bp), round(slots / (Bt * n_cb))))
    pch = -(-HW // ns)
    pch = -(-pch // bp) * bp                  # whole BP tiles per split
    ns = -(-HW // pch)
    return dict(BC=bc, BP=bp, NS=ns, PCH=pch, grid=(Bt, n_cb, ns), num_warps=_SUMS["num_warps"])


def _plane_sums(x_ct, x_pet, g_ct=None, g_pet=None, s=None):
    k = _kernels()
    Bt, C, H, W = x_ct.shape
    cfg = _sums_config(Bt, C, H, W, x_ct.device)
    out = torch.empty((Bt, 2, C, cfg["NS"]), dtype=torch.float64, device=x_ct.device)
    grad = g_ct is not None
    ga, gb = (g_ct, g_pet) if grad else (x_ct, x_pet)
    k["_plane_sums_kernel"][cfg["grid"]](
        x_ct, x_pet, ga, gb, s if grad else x_ct, out, C, H, W, cfg["NS"], cfg["PCH"],
        *x_ct.stride(), *x_pet.stride(), *ga.stride(), *gb.stride(),
        GRAD=grad, FLAT=all(t.stride(2) == W * t.stride(3) for t in (x_ct, x_pet, ga, gb)),
        BC=cfg["BC"], BP=cfg["BP"], num_warps=cfg["num_warps"])
    return out


def _mlp_meta(Bt, C, HID):
    """Block sizes of the four MLP launches: fwd_hid, bwd_hid over blocks of BH hidden units; fwd_out
    over blocks of BC output channels; bwd_in over NKB blocks of BK_IN input channels, then blocks of
    BC output channels. Under the interpreter every block is 16 wide, so the CPU tests' small
    widths run several blocks of each."""
    bb = max(16, _pow2(Bt))
    if interpreting():
        bh = bc = bk_in = chunk = 16
    else:
        bh, bc, bk_in = _MLP["BH"], _MLP["BC"], _MLP["BK_IN"]
        chunk = max(16, min(64, _MLP["TILE"] // bb))
    nw = _MLP["num_warps"]
    nkb = -(-2 * C // bk_in)
    return dict(
        fwd_hid=dict(grid=(-(-HID // bh), 2), BB=bb, BH=bh, BK=chunk, num_warps=nw),
        fwd_out=dict(grid=(-(-C // bc), 2), BB=bb, BC=bc, BKH=chunk, num_warps=nw),
        bwd_hid=dict(grid=(-(-HID // bh), 2), BB=bb, BH=bh, BC=chunk, num_warps=nw),
        bwd_in=dict(grid=(nkb + -(-C // bc), 2), NKB=nkb, BB=bb, BK=bk_in, BC=bc, BKH=chunk, num_warps=nw))


def _launch(kernel, cfg, *args, **const):
    cfg = dict(cfg)
    grid = cfg.pop("grid")
    nkb = cfg.pop("NKB", None)
    kernel[grid](*args, *(() if nkb is None else (nkb,)), **const, **cfg)


def supported(backend, x_ct, x_pet, mlp_ct: nn.Sequential, mlp_pet: nn.Sequential) -> str | None:
    """None when ``cgm_module`` can run CGM on these inputs with these MLPs and the gate's
    ``backend`` resolves to Triton; else why not (the module then runs its PyTorch path, which
    also raises the errors of bad inputs)."""
    if torch.compiler.is_compiling():
        return "under torch.compile (Inductor fuses the PyTorch path; the gate's ops are registered)"
    if not (isinstance(x_ct, torch.Tensor) and isinstance(x_pet, torch.Tensor) and x_ct.dim() == 4
            and x_pet.shape == x_ct.shape and x_pet.dtype == x_ct.dtype and x_pet.device == x_ct.device
            and x_ct.numel() > 0 and x_ct.dtype in gate._DTYPES):
        return "inputs the gate's checks refuse, or float64"
    try:
        if _backend.resolve("cgm_gate", backend, x_ct.device) is not gate:
            return "the gate's backend is not Triton"
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    Bt, C = x_ct.shape[:2]
    (a1, abn, agelu, a2), (b1, bbn, bgelu, b2) = mlp_ct, mlp_pet
    hid = a1.weight.shape[0]
    for bn in (abn, bbn):
        if type(bn) is not nn.BatchNorm2d:
            return f"{type(bn).__name__} (only nn.BatchNorm2d; SyncBatchNorm reduces across devices)"
        if not (bn.affine and bn.track_running_stats) or bn.momentum is None:
            return "BatchNorm without affine, running stats or a momentum"
    if (abn.momentum, abn.eps, abn.training) != (bbn.momentum, bbn.eps, bbn.training):
        return "the two BatchNorms differ in momentum, eps or mode"
    for g in (agelu, bgelu):
        if type(g) is not nn.GELU or g.approximate != "none":
            return "not the exact GELU"
    for conv1, bn, conv2 in ((a1, abn, a2), (b1, bbn, b2)):
        tensors = (conv1.weight, bn.weight, bn.bias, conv2.weight, conv2.bias, bn.running_mean, bn.running_var)
        if any(t is None or t.dtype != torch.float32 or not t.is_contiguous() or t.device != x_ct.device
               for t in tensors):
            return "MLP parameters not contiguous float32 on the activations' device"
        if conv1.weight.shape != (hid, 2 * C, 1, 1) or conv2.weight.shape != (C, hid, 1, 1) or conv1.bias is not None:
            return "not the CGM channel MLP's shapes"
    if max(16, _pow2(Bt)) > MAX_BB:
        return f"batch {Bt} exceeds the {MAX_BB} rows each MLP program holds"
    return None


class _FusedCGM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ct, x_pet, w_ct, w_pet, w1a, ga, ba, w2a, b2a, w1b, gb, bb, w2b, b2b,
                bufs, training, momentum, eps, residual):
        k = _kernels()
        Bt, C, H, W = x_ct.shape
        HID = w1a.shape[0]
        dev = x_ct.device
        P = _plane_sums(x_ct, x_pet)
        c = torch.empty((Bt, 2, C), dtype=torch.float32, device=dev)
        hsv = torch.empty((2, Bt, 2, HID), dtype=torch.float64, device=dev)   # h before BN, a after GELU
        st = torch.empty((2, 2, HID), dtype=torch.float64, device=dev)
        meta = _mlp_meta(Bt, C, HID)
        _launch(k["_mlp_fwd_hid_kernel"], meta["fwd_hid"], P, hsv[0], hsv[1], st, w1a, ga, ba, *bufs[0],
                w1b, gb, bb, *bufs[1], Bt, C, HID, P.shape[-1], H * W, float(momentum), float(eps),
                TRAIN=training)
        _launch(k["_mlp_fwd_out_kernel"], meta["fwd_out"], hsv[1], c, w2a, b2a, w2b, b2b, Bt, C, HID)
        c_ct, c_pet = c[:, 0], c[:, 1]
        y_ct, y_pet, s = gate._forward(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual)
        ctx.save_for_backward(x_ct, x_pet, w_ct, w_pet, w1a, ga, ba, w2a, w1b, gb, bb, w2b, P, c, hsv, st, s)
        ctx.training, ctx.residual = training, residual
        return y_ct, y_pet

    @staticmethod
    def backward(ctx, g_ct, g_pet):
        x_ct, x_pet, w_ct, w_pet, w1a, ga, ba, w2a, w1b, gb, bb, w2b, P, c, hsv, st, s = ctx.saved_tensors
        k = _kernels()
        Bt, C, H, W = x_ct.shape
        HID = w1a.shape[0]
        g_ct, g_pet = g_ct.to(x_ct.dtype), g_pet.to(x_pet.dtype)
        G = _plane_sums(x_ct, x_pet, g_ct, g_pet, s)
        # every MLP gradient in one buffer: [W1 (HID, 2C), gamma, beta (HID), W2 (C, HID), b2 (C)] x 2
        n1, n2 = HID * 2 * C, C * HID
        per = n1 + 2 * HID + n2 + C
        buf = torch.empty(2 * per, dtype=torch.float32, device=x_ct.device)
        parts = []
        for m in range(2):
            o = m * per
            parts += [buf[o:o + n1].view(w1a.shape), buf[o + n1:o + n1 + HID], buf[o + n1 + HID:o + n1 + 2 * HID],
                      buf[o + n1 + 2 * HID:o + n1 + 2 * HID + n2].view(w2a.shape), buf[o + per - C:o + per]]
        dF = torch.empty((Bt, 2, 2 * C), dtype=torch.float32, device=x_ct.device)
        dh = torch.empty((Bt, 2, HID), dtype=torch.float64, device=x_ct.device)
        meta = _mlp_meta(Bt, C, HID)
        # parts: [dW1, dgamma, dbeta, dW2, db2] of MLP 0, then of MLP 1
        _launch(k["_mlp_bwd_hid_kernel"], meta["bwd_hid"], G, G.shape[-1], c, hsv[0], st, dh,
                w2a, ga, ba, w2b, gb, bb, parts[1], parts[2], parts[6], parts[7], Bt, C, HID,
                TRAIN=ctx.training)
        _launch(k["_mlp_bwd_in_kernel"], meta["bwd_in"], G, G.shape[-1], P, P.shape[-1], c, hsv[1], dh, dF,
                w1a, w1b, parts[0], parts[3], parts[4], parts[5], parts[8], parts[9], Bt, C, HID, H * W)
        dxa, dxb, _, dw = gate._backward_launch(g_ct, g_pet, x_ct, x_pet, c[:, 0], c[:, 1], w_ct, w_pet, s,
                                                ctx.residual, dp=dF)
        dw = dw.sum(0)
        return (dxa, dxb, dw[0].view(w_ct.shape).to(w_ct.dtype), dw[1].view(w_pet.shape).to(w_pet.dtype), *parts,
                None, None, None, None, None)


def cgm_module(x_ct, x_pet, mlp_ct: nn.Sequential, mlp_pet: nn.Sequential, w_ct, w_pet, residual: bool):
    """The CGM module's forward (vmambax.models.fusion.CGM) on ``supported`` inputs: (y_ct, y_pet).
    mlp_*: conv1x1 (no bias), BatchNorm2d, GELU, conv1x1 (bias). BatchNorm in its own mode: in
    training, batch statistics, and the running stats and ``num_batches_tracked`` updated as
    ``nn.BatchNorm2d`` does; in eval, the running stats."""
    (a1, abn, _, a2), (b1, bbn, _, b2) = mlp_ct, mlp_pet
    bufs = ((abn.running_mean, abn.running_var, abn.num_batches_tracked),
            (bbn.running_mean, bbn.running_var, bbn.num_batches_tracked))
    return _FusedCGM.apply(x_ct, x_pet, w_ct, w_pet, a1.weight, abn.weight, abn.bias, a2.weight, a2.bias,
                           b1.weight, bbn.weight, bbn.bias, b2.weight, b2.bias, bufs, abn.training,
                           abn.momentum, abn.eps, bool(residual))
