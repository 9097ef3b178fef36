"""Triton kernels of the four-direction 2D selective scan (forward and backward).

One program walks one direction k of a block of BLOCK_D channels of BPP consecutive planes. The
walk goes chunk by chunk (T positions): the chunk's recurrence h_t = dA_t * h_{t-1} + dBu_t is one
``tl.associative_scan`` over a [T, BLOCK_D, NP] tile, and the state crosses chunks in registers.
Time is the tile's leading axis on purpose: Triton's default layout spreads the trailing axes
(channels, states) over lanes and warps and keeps the leading one in each thread's registers, so
the scan runs sequentially inside a thread with no shuffles. (With time as the middle axis it
spread over 8 warps and the scan went through shared memory: 21 ms instead of mamba-ssm's 5.6 ms
for enc1's forward on an H100.) B and C are loaded once per position for every channel of the
block. The four walks add their fp32 outputs into one float64 y with atomics (four adds per
element: exact in float64, so the result does not depend on their order; the host rounds it
once). The low-rank delta (dt_projs_weight @ dt) is formed per chunk in fp32 with ``tl.dot`` and
never stored.

The forward can save the state at the start of every chunk; the backward walks the chunks in
reverse, recomputes the chunk's states from the saved one, and runs the adjoint recurrence
g_t = gy_t * C_t + dA_{t+1} * g_{t+1} as a reverse scan. It needs dA_t * h_{t-1}, which is
h_t - dBu_t, so no shifted tile is formed for the states; dA_{t+1} is recomputed from delta at the
next step. Reductions over channels (dB, dC, du over walks, d(dt)) are atomics of fp32 values
into float64 buffers (the host rounds them once: deterministic but for rare ties); parameter
gradients are summed in registers over a program's planes (compensated: a plain fp32 sum over
1024 chunks missed the tolerance rule for dD by 4%), then stored as one
float64 partial row per program, which the host sums in float64 (deterministic: no float atomics).

The sequential kernels (``_ss2d_fwd_seq_kernel``, the default forward, and
``_ss2d_bwd_seq_kernel``, the backward behind ``bwd="seq"``) instead give each thread one channel
and walk the steps in order with the N states in registers; their docstrings give the design.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _lin_combine(a1, b1, a2, b2):
    # (a1, b1) is applied first: h -> a2 * (a1 * h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _walk_pos(t, k, H, W, L):
    """Position p = h*W + w visited at step t of walk k (SPEC.md section 1)."""
    tt = tl.where(k >= 2, L - 1 - t, t)
    return tl.where((k % 2) == 1, (tt % H) * W + tt // H, tt)


# The sequential kernels step through a walk one position at a time. Dividing by the runtime H at
# every step (_walk_pos) was a tenth of the sequential backward's instructions and samples (Nsight
# Compute, enc1 bf16, H200); these two carry the position and the row counter tt % H instead.
@triton.jit
def _walk_start(t, k, H, W, L):
    """(p, r) at step t of walk k: p as _walk_pos gives it, r = tt % H, for _walk_next."""
    tt = tl.where(k >= 2, L - 1 - t, t)
    r = tt % H
    return tl.where((k % 2) == 1, r * W + tt // H, tt), r


@triton.jit
def _walk_next(p, r, k, H, W, DIR: tl.constexpr):
    """(p, r) at step t + DIR (DIR = 1 or -1) from (p, r) at step t of walk k."""
    s = tl.where(k >= 2, -DIR, DIR)  # the step of tt
    r = r + s
    wrap = (r == H) | (r < 0)  # a transposed walk (odd k) moves to the next or the previous column
    p_odd = p + s * W + tl.where(wrap, s * (1 - H * W), 0)
    r = tl.where(r == H, 0, tl.where(r < 0, H - 1, r))
    return tl.where((k % 2) == 1, p_odd, p + s), r


@triton.jit
def _exp(x, INTERP: tl.constexpr):
    """exp to ~1 ulp: tl.exp is ex2.approx(x * log2 e), whose rounded product puts |x| * 6e-8 of
    relative error on the result (~7 ulp at VMamba's pre-softplus x ~ -7), in every delta."""
    if INTERP:
        return tl.exp(x)   # numpy's
    else:
        return libdevice.exp(x)


@triton.jit
def _softplus(x, INTERP: tl.constexpr):
    e = _exp(x, INTERP)
    if INTERP:
        # numpy's log is exact to an ulp; Kahan's trick recovers log1p from it
        one = 1.0 + e
        lp = tl.where(one == 1.0, e, tl.log(one) * (e / (one - 1.0)))
    else:
        lp = libdevice.log1p(e)
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _load_delta(dl_ptr, w_ptr, kd, R, base, offs_d, p, mask_d, mask_t, s_c, bias, BLOCK_D: tl.constexpr,
                LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                INTERP: tl.constexpr):
    """delta (+ bias) at positions p for the block's channels: [T, BLOCK_D] fp32 (pre-softplus, post)
    and what was loaded (delta; None for the low-rank form)."""
    if LOWRANK:
        # delta = W @ dt as R rank-1 updates in fp32 FMAs. Not tl.dot: on the H100 the dots of the
        # first version gave TF32-sized errors (~1e-3 relative) in the low-rank gradients.
        x = tl.zeros([p.shape[0], BLOCK_D], dtype=tl.float32)
        for r in range(R):
            dt_r = tl.load(dl_ptr + base + r * s_c + p, mask=mask_t, other=0.0).to(tl.float32)
            w_r = tl.load(w_ptr + kd * R + r, mask=mask_d, other=0.0)
            x += dt_r[:, None] * w_r[None, :]
        dt = x   # unused by the callers (a None here does not compile)
    else:
        dt = tl.load(dl_ptr + base + offs_d[None, :] * s_c + p[:, None],
                     mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        x = dt
    if HAS_BIAS:
        x = x + bias[None, :]
    if SOFTPLUS:
        dl = _softplus(x, INTERP)
    else:
        dl = x
    return x, dl, dt


@triton.jit
def _kahan(acc, comp, x):
    y = x - comp
    t = acc + y
    return t, (t - acc) - y


@triton.jit
def _kahan_total(acc, comp):
    # the compensated sum is acc - comp; in float64 the subtraction keeps both parts
    return acc.to(tl.float64) - comp.to(tl.float64)


# Sizes are plain arguments: one compiled kernel serves every shape of a dtype and N.
@triton.jit(do_not_specialize=["Bt", "n_db", "n_chunks", "BPP"])
def _ss2d_fwd_kernel(
    u_ptr, dl_ptr, w_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, st_ptr,
    Bt, Dm, H, W, L, N, R, n_db, n_chunks, BPP,
    su_b, su_d, sdl_b, sdl_k, sdl_c, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n,
    BLOCK_D: tl.constexpr, T: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
    LOWRANK: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE: tl.constexpr, INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    k = tl.program_id(1)
    db = pid % n_db
    b0 = (pid // n_db) * BPP
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NP)
    offs_t = tl.arange(0, T)
    offs_r = tl.arange(0, RP)
    mask_d = offs_d < Dm
    mask_n = offs_n < N
    mask_r = offs_r < R
    kd = k * Dm + offs_d
    mdn = mask_d[:, None] & mask_n[None, :]
    A2 = tl.load(A_ptr + (k * N + offs_n[None, :]) * Dm + offs_d[:, None], mask=mdn, other=0.0) * LOG2E   # [BLOCK_D, NP]
    Dv = tl.load(D_ptr + kd, mask=mask_d, other=0.0) if HAS_D else None
    bias = tl.load(bias_ptr + kd, mask=mask_d, other=0.0) if HAS_BIAS else None

    for i in range(BPP):
        b = b0 + i
        b_ok = b < Bt
        bb = b.to(tl.int64)
        h = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
        for c in range(n_chunks):
            t = c * T + offs_t
            mask_t = (t < L) & b_ok
            p = tl.where(mask_t, _walk_pos(t, k, H, W, L), 0)
            m2 = mask_t[:, None] & mask_d[None, :]
            mtn = mask_t[:, None] & mask_n[None, :]
            u = tl.load(u_ptr + bb * su_b + offs_d[None, :] * su_d + p[:, None], mask=m2, other=0.0).to(tl.float32)
            _, dl, _ = _load_delta(dl_ptr, w_ptr, kd, R, bb * sdl_b + k * sdl_k, offs_d, p, mask_d, mask_t,
                                   sdl_c, bias, BLOCK_D, LOWRANK, HAS_BIAS, SOFTPLUS, INTERP)
            Bv = tl.load(B_ptr + bb * sB_b + k * sB_k + offs_n[None, :] * sB_n + p[:, None], mask=mtn,
                         other=0.0).to(tl.float32)                                        # [T, NP]
            Cv = tl.load(C_ptr + bb * sC_b + k * sC_k + offs_n[None, :] * sC_n + p[:, None], mask=mtn,
                         other=0.0).to(tl.float32)
            if SAVE:
                st = st_ptr + (((bb * 4 + k) * n_chunks + c) * N + offs_n[None, :]) * Dm + offs_d[:, None]
                tl.store(st, h, mask=mdn & b_ok)
            dA = tl.exp2(dl[:, :, None] * A2[None, :, :])                                 # [T, BLOCK_D, NP]
            dBu = (dl * u)[:, :, None] * Bv[:, None, :]
            Pa, Pb = tl.associative_scan((dA, dBu), 0, _lin_combine)
            hs = Pa * h[None, :, :] + Pb
            y = tl.sum(hs * Cv[:, None, :], axis=2)                                      # [T, BLOCK_D]
            if HAS_D:
                y += Dv[None, :] * u
            tl.atomic_add(y_ptr + bb * Dm * L + offs_d[None, :] * L + p[:, None], y.to(tl.float64), mask=m2,
                          sem="relaxed")
            h = tl.sum(tl.where(offs_t[:, None, None] == T - 1, hs, 0.0), axis=0)


@triton.jit(do_not_specialize=["Bt", "n_db", "n_chunks", "BPP"])
def _ss2d_bwd_kernel(
    u_ptr, dl_ptr, w_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, st_ptr, gy_ptr,
    du_ptr, ddl_ptr, pA_ptr, dB_ptr, dC_ptr, pD_ptr, pbias_ptr, pw_ptr,
    Bt, Dm, H, W, L, N, R, n_db, n_chunks, BPP,
    su_b, su_d, sdl_b, sdl_k, sdl_c, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n, sg_b, sg_d,
    BLOCK_D: tl.constexpr, T: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
    LOWRANK: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    k = tl.program_id(1)
    db = pid % n_db
    b0 = (pid // n_db) * BPP
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NP)
    offs_t = tl.arange(0, T)
    offs_r = tl.arange(0, RP)
    mask_d = offs_d < Dm
    mask_n = offs_n < N
    mask_r = offs_r < R
    kd = k * Dm + offs_d
    mdn = mask_d[:, None] & mask_n[None, :]
    mrd = mask_r[:, None] & mask_d[None, :]
    A = tl.load(A_ptr + kd[:, None] * N + offs_n[None, :], mask=mdn, other=0.0)
    A2 = A * LOG2E
    Dv = tl.load(D_ptr + kd, mask=mask_d, other=0.0) if HAS_D else None
    bias = tl.load(bias_ptr + kd, mask=mask_d, other=0.0) if HAS_BIAS else None

    # parameter gradients, with their compensation terms
    dA_acc = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
    dA_c = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dD_c = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_c = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw_acc = tl.zeros([RP, BLOCK_D], dtype=tl.float32)
    dw_c = tl.zeros([RP, BLOCK_D], dtype=tl.float32)
    for i in range(BPP):
        b = b0 + i
        b_ok = b < Bt
        bb = b.to(tl.int64)
        dl_base = bb * sdl_b + k * sdl_k
        carry = tl.zeros([BLOCK_D, NP], dtype=tl.float32)   # dA_{t0'} * g_{t0'} of the chunk after
        for cc in range(n_chunks):
            c = n_chunks - 1 - cc
            t = c * T + offs_t
            mask_t = (t < L) & b_ok
            p = tl.where(mask_t, _walk_pos(t, k, H, W, L), 0)
            m2 = mask_t[:, None] & mask_d[None, :]
            mtn = mask_t[:, None] & mask_n[None, :]
            u = tl.load(u_ptr + bb * su_b + offs_d[None, :] * su_d + p[:, None], mask=m2, other=0.0).to(tl.float32)
            gy = tl.load(gy_ptr + bb * sg_b + offs_d[None, :] * sg_d + p[:, None], mask=m2, other=0.0).to(tl.float32)
            x, dl, _ = _load_delta(dl_ptr, w_ptr, kd, R, dl_base, offs_d, p, mask_d, mask_t, sdl_c,
                                   bias, BLOCK_D, LOWRANK, HAS_BIAS, SOFTPLUS, INTERP)
            Bv = tl.load(B_ptr + bb * sB_b + k * sB_k + offs_n[None, :] * sB_n + p[:, None], mask=mtn,
                         other=0.0).to(tl.float32)
            Cv = tl.load(C_ptr + bb * sC_b + k * sC_k + offs_n[None, :] * sC_n + p[:, None], mask=mtn,
                         other=0.0).to(tl.float32)
            st = st_ptr + (((bb * 4 + k) * n_chunks + c) * N + offs_n[None, :]) * Dm + offs_d[:, None]
            h0 = tl.load(st, mask=mdn & b_ok, other=0.0)

            # forward states of the chunk, recomputed from its saved start
            dA = tl.exp2(dl[:, :, None] * A2[None, :, :])                                 # [T, BLOCK_D, NP]
            dlu = dl * u
            dBu = dlu[:, :, None] * Bv[:, None, :]
            Pa, Pb = tl.associative_scan((dA, dBu), 0, _lin_combine)
            hs = Pa * h0[None, :, :] + Pb

            # decay of the next step inside the chunk (the last step takes the carry instead)
            tn = t + 1
            mask_nx = (offs_t < T - 1) & (tn < L) & b_ok
            pn = tl.where(mask_nx, _walk_pos(tn, k, H, W, L), 0)
            _, dln, _ = _load_delta(dl_ptr, w_ptr, kd, R, dl_base, offs_d, pn, mask_d, mask_nx, sdl_c,
                                    bias, BLOCK_D, LOWRANK, HAS_BIAS, SOFTPLUS, INTERP)
            alpha = tl.where(mask_nx[:, None, None], tl.exp2(dln[:, :, None] * A2[None, :, :]), 1.0)
            cg = gy[:, :, None] * Cv[:, None, :]
            Pr, Gr = tl.associative_scan((alpha, cg), 0, _lin_combine, reverse=True)
            g = Gr + Pr * carry[None, :, :]
            carry = tl.sum(tl.where(offs_t[:, None, None] == 0, dA * g, 0.0), axis=0)

            off_tn = (bb * 4 + k) * N * L + offs_n[None, :] * L + p[:, None]
            tl.atomic_add(dC_ptr + off_tn, tl.sum(gy[:, :, None] * hs, axis=1).to(tl.float64), mask=mtn,
                          sem="relaxed")
            tl.atomic_add(dB_ptr + off_tn, tl.sum(g * dlu[:, :, None], axis=1).to(tl.float64), mask=mtn,
                          sem="relaxed")
            hm = hs - dBu                                   # dA_t * h_{t-1}
            gB = tl.sum(g * Bv[:, None, :], axis=2)                                       # [T, BLOCK_D]
            ddl = tl.sum(g * hm * A[None, :, :], axis=2) + u * gB
            dA_acc, dA_c = _kahan(dA_acc, dA_c, tl.sum(g * hm * dl[:, :, None], axis=0))
            du = dl * gB
            if HAS_D:
                du += Dv[None, :] * gy
                dD_acc, dD_c = _kahan(dD_acc, dD_c, tl.sum(gy * u, axis=0))
            tl.atomic_add(du_ptr + bb * Dm * L + offs_d[None, :] * L + p[:, None], du.to(tl.float64), mask=m2,
                          sem="relaxed")
            if SOFTPLUS:
                ddl = tl.div_rn(ddl, 1.0 + _exp(-x, INTERP))  # `/` is div.full.f32 (2 ulp)
            ddl = tl.where(m2, ddl, 0.0)
            if HAS_BIAS:
                dbias_acc, dbias_c = _kahan(dbias_acc, dbias_c, tl.sum(ddl, axis=0))
            if LOWRANK:
                # d dt and dW one rank at a time in fp32 (no tl.dot: see _load_delta)
                dw_chunk = tl.zeros([RP, BLOCK_D], dtype=tl.float32)
                for r in range(R):
                    w_r = tl.load(w_ptr + kd * R + r, mask=mask_d, other=0.0)
                    tl.atomic_add(ddl_ptr + ((bb * 4 + k) * R + r) * L + p,
                                  tl.sum(ddl * w_r[None, :], axis=1).to(tl.float64), mask=mask_t, sem="relaxed")
                    dt_r = tl.load(dl_ptr + dl_base + r * sdl_c + p, mask=mask_t, other=0.0).to(tl.float32)
                    dw_chunk += tl.where(offs_r[:, None] == r, tl.sum(dt_r[:, None] * ddl, axis=0)[None, :], 0.0)
                dw_acc, dw_c = _kahan(dw_acc, dw_c, dw_chunk)
            else:
                tl.store(ddl_ptr + (bb * 4 + k) * Dm * L + offs_d[None, :] * L + p[:, None], ddl, mask=m2)

    # one float64 partial row per plane group (sum - compensation), summed by the host in float64:
    # no float atomics, so the parameter gradients do not depend on the programs' order
    pg = (pid // n_db).to(tl.int64) * 4 * Dm
    tl.store(pA_ptr + (pg + kd[:, None]) * N + offs_n[None, :], _kahan_total(dA_acc, dA_c), mask=mdn)
    if HAS_D:
        tl.store(pD_ptr + pg + kd, _kahan_total(dD_acc, dD_c), mask=mask_d)
    if HAS_BIAS:
        tl.store(pbias_ptr + pg + kd, _kahan_total(dbias_acc, dbias_c), mask=mask_d)
    if LOWRANK:
        tl.store(pw_ptr + (pg + kd[None, :]) * R + offs_r[:, None], _kahan_total(dw_acc, dw_c), mask=mrd)



@triton.jit
def _seq_step(p, u_ptr, dl_ptr, B_ptr, C_ptr, u_base, dl_base, B_base, C_base,
              offs_d, offs_n, offs_r, mask_d, mask_n, mask_r, N, R, su_d, sdl_c, one, w_tile, bias, A2,
              LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              NEED_C: tl.constexpr, INTERP: tl.constexpr):
    """One step of the walk at position p for a block of channels: (p, u, delta, decay dA, input dBu, C)."""
    u = tl.load(u_ptr + u_base + offs_d * su_d + p, mask=mask_d, other=0.0).to(tl.float32)
    if LOWRANK:
        # dt is (Bt, 4, L, R): the step's R values are contiguous and shared by the block
        dtv = tl.load(dl_ptr + dl_base + p * R + offs_r * one, mask=mask_r, other=0.0).to(tl.float32)
        x = tl.sum(w_tile * dtv[None, :], axis=1)
    else:
        x = tl.load(dl_ptr + dl_base + offs_d * sdl_c + p, mask=mask_d, other=0.0).to(tl.float32)
        dtv = x   # unused by the callers (every branch must return a tensor to compile)
    if HAS_BIAS:
        x = x + bias
    if SOFTPLUS:
        dl = _softplus(x, INTERP)
    else:
        dl = x
    # B, C are (Bt, 4, L, N): one step's N values share a sector. ``one`` (a runtime 1) hides that
    # they are contiguous: a vectorised load would spread the states over lanes (see the kernel).
    # int32 offsets: the compiler hoists the per-state part out of the loop (16 registers, not 64)
    off_n = p * N + offs_n * one
    Bv = tl.load(B_ptr + B_base + off_n, mask=mask_n, other=0.0).to(tl.float32)
    if NEED_C:
        Cv = tl.load(C_ptr + C_base + off_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        Cv = Bv
    dA = tl.exp2(dl[:, None] * A2)
    dBu = (dl * u)[:, None] * Bv[None, :]
    return p, u, dl, dA, dBu, Cv, x, Bv, dtv


@triton.jit(do_not_specialize=["Bt", "Dm", "n_db", "n_ck", "TC", "BPP", "n_st", "one"])
def _ss2d_fwd_seq_kernel(
    u_ptr, dl_ptr, w_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, st_ptr, he_ptr, S_ptr,
    Bt, Dm, H, W, L, N, R, n_db, n_ck, TC, BPP, n_st,
    su_b, su_d, sdl_b, sdl_k, sdl_c, one,
    BLOCK_D: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, TS: tl.constexpr, PHASE: tl.constexpr,
    LOWRANK: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE: tl.constexpr, INTERP: tl.constexpr,
):
    """Forward, one thread per channel walking its steps in order with the N states in registers.

    Program = (channel block, chunk c of TC steps) x (BPP planes) x walk k. PHASE 0 walks chunk c
    from a zero state and stores its end state he (Bt, 4, n_ck, N, Dm) and its sum of delta S
    (Bt, 4, n_ck, Dm). PHASE 1 folds the chunks before c into the entering state
    (h <- exp2(A2 * S_c') * h + he_c'), walks chunk c again adding the fp32 y_k into the float64 y
    (atomics), and saves the state every TS steps for the backward (st: (Bt, 4, n_st, N, Dm)).
    B, C (and the low-rank dt) come as (Bt, 4, L, N|R) contiguous copies; A as (4, N, Dm) and W
    as (4, R, Dm). Every [BLOCK_D, *] tile is contiguous along channels and Dm is not specialised,
    so the compiler does not vectorise them and its layout puts channels on lanes and the states in
    each thread's registers (the sum over states needs no shuffles, per-channel work is done once).
    """
    pid = tl.program_id(0)
    db = pid % n_db
    c = pid // n_db
    b0 = tl.program_id(1) * BPP
    k = tl.program_id(2)
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NP)
    offs_r = tl.arange(0, RP)
    mask_d = offs_d < Dm
    mask_n = offs_n < N
    mask_r = offs_r < R
    kd = k * Dm + offs_d
    mdn = mask_d[:, None] & mask_n[None, :]
    A2 = tl.load(A_ptr + (k * N + offs_n[None, :]) * Dm + offs_d[:, None], mask=mdn, other=0.0) * LOG2E
    Dv = tl.load(D_ptr + kd, mask=mask_d, other=0.0) if HAS_D else None
    bias = tl.load(bias_ptr + kd, mask=mask_d, other=0.0) if HAS_BIAS else None
    w_tile = tl.load(w_ptr + (k * R + offs_r[None, :]) * Dm + offs_d[:, None], mask=mask_d[:, None] & mask_r[None, :],
                     other=0.0) if LOWRANK else None                                      # [BLOCK_D, RP]
    t0 = c * TC
    t1 = tl.minimum(t0 + TC, L)
    b_end = tl.minimum(b0 + BPP, Bt)
    for i in range(0, b_end - b0):
        bb = (b0 + i).to(tl.int64)
        u_base = bb * su_b
        dl_base = bb * sdl_b + k * sdl_k
        B_base = (bb * 4 + k) * L * N
        bk = bb * 4 + k
        h = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
        if PHASE == 0:
            S = tl.zeros([BLOCK_D], dtype=tl.float32)
            p, rh = _walk_start(t0, k, H, W, L)
            for t in range(t0, t1):
                p, u, dl, dA, dBu, Cv, _, _, _ = _seq_step(
                    p, u_ptr, dl_ptr, B_ptr, C_ptr, u_base, dl_base, B_base, B_base,
                    offs_d, offs_n, offs_r, mask_d, mask_n, mask_r, N, R, su_d, sdl_c, one, w_tile, bias, A2,
                    LOWRANK, HAS_BIAS, SOFTPLUS, False, INTERP)
                h = dA * h + dBu
                S += dl
                p, rh = _walk_next(p, rh, k, H, W, 1)
            tl.store(he_ptr + ((bk * n_ck + c) * N + offs_n[None, :]) * Dm + offs_d[:, None], h, mask=mdn)
            tl.store(S_ptr + (bk * n_ck + c) * Dm + offs_d, S, mask=mask_d)
        else:
            for cp in range(c):
                S = tl.load(S_ptr + (bk * n_ck + cp) * Dm + offs_d, mask=mask_d, other=0.0)
                he = tl.load(he_ptr + ((bk * n_ck + cp) * N + offs_n[None, :]) * Dm + offs_d[:, None],
                             mask=mdn, other=0.0)
                h = tl.exp2(A2 * S[:, None]) * h + he
            p, rh = _walk_start(t0, k, H, W, L)
            for ts in range(t0, t1, TS):
                if SAVE:
                    tl.store(st_ptr + ((bk * n_st + ts // TS) * N + offs_n[None, :]) * Dm + offs_d[:, None], h,
                             mask=mdn)
                for t in range(ts, tl.minimum(ts + TS, t1)):
                    p, u, dl, dA, dBu, Cv, _, _, _ = _seq_step(
                        p, u_ptr, dl_ptr, B_ptr, C_ptr, u_base, dl_base, B_base, B_base,
                        offs_d, offs_n, offs_r, mask_d, mask_n, mask_r, N, R, su_d, sdl_c, one, w_tile, bias, A2,
                        LOWRANK, HAS_BIAS, SOFTPLUS, True, INTERP)
                    h = dA * h + dBu
                    y = tl.sum(h * Cv[None, :], axis=1)
                    if HAS_D:
                        y += Dv * u
                    tl.atomic_add(y_ptr + bb * Dm * L + offs_d * L + p, y.to(tl.float64), mask=mask_d, sem="relaxed")
                    p, rh = _walk_next(p, rh, k, H, W, 1)


@triton.jit(do_not_specialize=["Bt", "Dm", "n_db", "n_ck", "TC", "BPP", "n_st", "one"])
def _ss2d_bwd_seq_kernel(
    u_ptr, dl_ptr, w_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, st_ptr, gy_ptr, ge_ptr, S_ptr, scr_ptr,
    du_ptr, ddl_ptr, dB_ptr, dC_ptr, pA_ptr, pD_ptr, pbias_ptr, pw_ptr,
    Bt, Dm, H, W, L, N, R, n_db, n_ck, TC, BPP, n_st,
    su_b, su_d, sdl_b, sdl_k, sdl_c, sg_b, sg_d, one,
    BLOCK_D: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, TS: tl.constexpr, PHASE: tl.constexpr,
    LOWRANK: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Backward in the design of the sequential forward: one thread per channel, N states in registers.

    Program = (channel block, chunk c of TC steps) x (BPP planes) x walk k, as the forward. With
    g_t = dL/dh_t, the adjoint runs backwards: g_t = C_t gy_t + X_t, X_t = dA_{t+1} g_{t+1}.
    PHASE 0 (several chunks only) walks chunk c backwards from X = 0 and stores what it hands to
    the chunk before, E_c = dA_{t0} g_{t0} (ge: (Bt, 4, n_ck, N, Dm)), and its sum of delta S_c:
    the true carry entering chunk c-1 is E_c + exp2(A2 * S_c) * (carry entering chunk c).
    PHASE 1 folds the later chunks into the carry entering chunk c, then takes the chunk's
    TS-step segments last to first: it replays the segment forward from the state the forward saved
    at its start, keeping a_t h_{t-1}, x_t and delta_t in a scratch row (TS x (N + 3) x Dm fp32 per chunk,
    plane group and walk; each thread reads back only what it wrote), then walks it backwards
    with the adjoint. Replay instead of inverting the recurrence: h_{t-1} = (h_t - dBu_t) / dA_t
    loses digits fast. Sums over channels (dB, dC, the low-rank d dt) are reduced in the block
    (tl.sum over the lane axis) and added with one float64 atomic per element and program (du:
    one per element and walk, float64 too); d dt and dW are formed at the end of each segment
    from the d delta kept in the scratch, one rank at a time. dA, dD, d bias, dW are per-program
    partial rows of (n_parts, 4, ...) buffers (each row has one owner), summed by the host in
    float64: no float atomics, so they do not depend on the programs' order.
    """
    pid = tl.program_id(0)
    db = pid % n_db
    c = pid // n_db
    if PHASE == 0:
        c += 1   # chunk 0 hands nothing on: PHASE 0 skips it
    pb = tl.program_id(1)
    b0 = pb * BPP
    k = tl.program_id(2)
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NP)
    offs_r = tl.arange(0, RP)
    mask_d = offs_d < Dm
    mask_n = offs_n < N
    mask_r = offs_r < R
    kd = k * Dm + offs_d
    mdn = mask_d[:, None] & mask_n[None, :]
    off_dn = offs_n[None, :] * Dm + offs_d[:, None]                 # [BLOCK_D, NP] into (.., N, Dm)
    A2 = tl.load(A_ptr + k * N * Dm + off_dn, mask=mdn, other=0.0) * LOG2E   # A itself is not kept (registers)
    Dv = tl.load(D_ptr + kd, mask=mask_d, other=0.0) if HAS_D else None
    bias = tl.load(bias_ptr + kd, mask=mask_d, other=0.0) if HAS_BIAS else None
    w_tile = tl.load(w_ptr + (k * R + offs_r[None, :]) * Dm + offs_d[:, None], mask=mask_d[:, None] & mask_r[None, :],
                     other=0.0) if LOWRANK else None                                      # [BLOCK_D, RP]
    t0 = c * TC
    t1 = tl.minimum(t0 + TC, L)
    b_end = tl.minimum(b0 + BPP, Bt)
    if PHASE == 0:
        for i in range(0, b_end - b0):
            bb = (b0 + i).to(tl.int64)
            bk = bb * 4 + k
            X = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
            S = tl.zeros([BLOCK_D], dtype=tl.float32)
            p, rh = _walk_start(t1 - 1, k, H, W, L)
            for j in range(0, t1 - t0):
                p, u, dl, dA, dBu, Cv, x, Bv, dtv = _seq_step(
                    p, u_ptr, dl_ptr, B_ptr, C_ptr, bb * su_b, bb * sdl_b + k * sdl_k, bk * L * N,
                    bk * L * N, offs_d, offs_n, offs_r, mask_d, mask_n, mask_r, N, R, su_d, sdl_c, one, w_tile,
                    bias, A2, LOWRANK, HAS_BIAS, SOFTPLUS, True, INTERP)
                gy = tl.load(gy_ptr + bb * sg_b + offs_d * sg_d + p, mask=mask_d, other=0.0).to(tl.float32)
                X = dA * (X + Cv[None, :] * gy[:, None])
                S += dl
                p, rh = _walk_next(p, rh, k, H, W, -1)
            tl.store(ge_ptr + (bk * n_ck + c) * N * Dm + off_dn, X, mask=mdn)
            tl.store(S_ptr + (bk * n_ck + c) * Dm + offs_d, S, mask=mask_d)
    else:
        # per-program partials: dA and dW summed per segment and added into their fp32
        # (n_parts, 4, ..) rows in memory (each row has one owner: plain read-modify-write, and no
        # NP- or R-sized accumulators live in registers through the walk); dD and d bias
        # compensated per step, stored as float64 (sum - compensation). float64 dA rows cost
        # registers (ptxas, sm_90, N=16, plain fp32: 224 -> 254; a per-state loop 252), so they stay fp32.
        dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dD_cmp = tl.zeros([BLOCK_D], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dbias_cmp = tl.zeros([BLOCK_D], dtype=tl.float32)
        part = (c * tl.num_programs(1) + pb) * 4 + k
        # Scratch, one row per (chunk, plane group, walk) shared by its channel blocks: h [TS, N, Dm],
        # then x, delta and d delta [TS, Dm] each. Every thread reads back only what it wrote (the
        # barriers are for safety, one warp). Indexed like the saved states (off_dn), so no second
        # [BLOCK_D, NP] offset tile stays live through the walk (each costs NP registers).
        scr_h = scr_ptr + part.to(tl.int64) * (TS * (N + 3) * Dm)
        scr_x = scr_h + TS * N * Dm
        scr_dl = scr_x + TS * Dm
        scr_g = scr_dl + TS * Dm
        n_seg = tl.cdiv(t1 - t0, TS)
        for i in range(0, b_end - b0):
            bb = (b0 + i).to(tl.int64)
            bk = bb * 4 + k
            u_base = bb * su_b
            dl_base = bb * sdl_b + k * sdl_k
            B_base = bk * L * N
            g_base = bb * sg_b
            X = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
            for cn in range(0, n_ck - 1 - c):
                cp = n_ck - 1 - cn
                S = tl.load(S_ptr + (bk * n_ck + cp) * Dm + offs_d, mask=mask_d, other=0.0)
                E = tl.load(ge_ptr + (bk * n_ck + cp) * N * Dm + off_dn, mask=mdn, other=0.0)
                X = tl.exp2(A2 * S[:, None]) * X + E
            for si in range(0, n_seg):
                ts = t0 + (n_seg - 1 - si) * TS
                te = tl.minimum(ts + TS, t1)
                # replay: h_t, x_t, delta_t of the segment into the scratch; dC_t = sum_d gy_t h_t
                h = tl.load(st_ptr + (bk * n_st + ts // TS) * N * Dm + off_dn, mask=mdn, other=0.0)
                p, rh = _walk_start(ts, k, H, W, L)
                for t in range(ts, te):
                    p, u, dl, dA, dBu, Cv, x, Bv, dtv = _seq_step(
                        p, u_ptr, dl_ptr, B_ptr, C_ptr, u_base, dl_base, B_base, B_base,
                        offs_d, offs_n, offs_r, mask_d, mask_n, mask_r, N, R, su_d, sdl_c, one, w_tile, bias, A2,
                        LOWRANK, HAS_BIAS, SOFTPLUS, False, INTERP)
                    # a_t h_{t-1} kept as is: h_t - dBu_t cancels (not 0 where h_{t-1} = 0, e.g. L = 1)
                    ah = dA * h
                    h = ah + dBu
                    tl.store(scr_h + (t - ts) * (N * Dm) + off_dn, ah, mask=mdn)
                    tl.store(scr_x + (t - ts) * Dm + offs_d, x, mask=mask_d)
                    tl.store(scr_dl + (t - ts) * Dm + offs_d, dl, mask=mask_d)
                    gy = tl.load(gy_ptr + g_base + offs_d * sg_d + p, mask=mask_d, other=0.0).to(tl.float32)
                    tl.atomic_add(dC_ptr + B_base + p * N + offs_n, tl.sum(gy[:, None] * h, axis=0).to(tl.float64),
                                  mask=mask_n, sem="relaxed")
                    p, rh = _walk_next(p, rh, k, H, W, 1)
                tl.debug_barrier()
                seg_dA = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
                p, rh = _walk_next(p, rh, k, H, W, -1)  # step te - 1, where the reverse walk starts
                for j in range(0, te - ts):
                    t = te - 1 - j
                    u = tl.load(u_ptr + u_base + offs_d * su_d + p, mask=mask_d, other=0.0).to(tl.float32)
                    gy = tl.load(gy_ptr + g_base + offs_d * sg_d + p, mask=mask_d, other=0.0).to(tl.float32)
                    off_n = p * N + offs_n * one
                    Bv = tl.load(B_ptr + B_base + off_n, mask=mask_n, other=0.0).to(tl.float32)
                    Cv = tl.load(C_ptr + B_base + off_n, mask=mask_n, other=0.0).to(tl.float32)
                    x = tl.load(scr_x + (t - ts) * Dm + offs_d, mask=mask_d, other=0.0)
                    dl = tl.load(scr_dl + (t - ts) * Dm + offs_d, mask=mask_d, other=0.0)
                    ah = tl.load(scr_h + (t - ts) * (N * Dm) + off_dn, mask=mdn, other=0.0)
                    g = X + Cv[None, :] * gy[:, None]
                    dlu = dl * u
                    tl.atomic_add(dB_ptr + B_base + p * N + offs_n, tl.sum(g * dlu[:, None], axis=0).to(tl.float64),
                                  mask=mask_n, sem="relaxed")
                    gh = g * ah                                    # g_t * dA_t * h_{t-1}
                    seg_dA += gh * dl[:, None]
                    gB = tl.sum(g * Bv[None, :], axis=1)
                    ddl = tl.sum(gh * A2, axis=1) * (1.0 / LOG2E) + u * gB
                    du = dl * gB
                    if HAS_D:
                        du += Dv * gy
                        dD_acc, dD_cmp = _kahan(dD_acc, dD_cmp, gy * u)
                    tl.atomic_add(du_ptr + bb * Dm * L + offs_d * L + p, du.to(tl.float64), mask=mask_d, sem="relaxed")
                    if SOFTPLUS:
                        ddl = tl.div_rn(ddl, 1.0 + _exp(-x, INTERP))  # `/` is div.full.f32 (2 ulp)
                    ddl = tl.where(mask_d, ddl, 0.0)
                    if HAS_BIAS:
                        dbias_acc, dbias_cmp = _kahan(dbias_acc, dbias_cmp, ddl)
                    if LOWRANK:
                        tl.store(scr_g + (t - ts) * Dm + offs_d, ddl, mask=mask_d)
                    else:
                        tl.store(ddl_ptr + (bk * Dm + offs_d) * L + p, ddl, mask=mask_d)
                    X = tl.exp2(dl[:, None] * A2) * g
                    p, rh = _walk_next(p, rh, k, H, W, -1)
                pA_row = pA_ptr + part * N * Dm + off_dn
                tl.store(pA_row, tl.load(pA_row, mask=mdn, other=0.0) + seg_dA, mask=mdn)
                if LOWRANK:
                    # d dt_t[r] = sum_d W[d, r] d delta_t[d] (one atomic per program) and
                    # dW[d, r] += sum_t d delta_t[d] dt_t[r], one rank at a time over the segment's
                    # [TS, BLOCK_D] tile of d delta: the W column, the dt column and the dW row are
                    # the only rank-sized values, never a [BLOCK_D, RP] tile. (Step by step, with a
                    # scalar dt load and a channel sum per step and rank, this loop was a sixth of the
                    # backward's stall samples: Nsight Compute, enc1 bf16, H200.)
                    tl.debug_barrier()
                    jj = tl.arange(0, TS)
                    on_j = jj < te - ts
                    pj = tl.where(on_j, _walk_pos(ts + jj, k, H, W, L), 0)
                    G = tl.load(scr_g + jj[:, None] * Dm + offs_d[None, :], mask=on_j[:, None] & mask_d[None, :],
                                other=0.0)                                                 # [TS, BLOCK_D]
                    for r in range(0, R):
                        w_r = tl.load(w_ptr + (k * R + r) * Dm + offs_d, mask=mask_d, other=0.0)
                        tl.atomic_add(ddl_ptr + (bk * L + pj) * R + r, tl.sum(G * w_r[None, :], axis=1).to(tl.float64),
                                      mask=on_j, sem="relaxed")
                        dt_r = tl.load(dl_ptr + dl_base + pj * R + r, mask=on_j, other=0.0).to(tl.float32)
                        dw_r = tl.sum(G * dt_r[:, None], axis=0)
                        pw_row = pw_ptr + (part * R + r) * Dm + offs_d
                        tl.store(pw_row, tl.load(pw_row, mask=mask_d, other=0.0) + dw_r, mask=mask_d)
                # the next segment's replay overwrites the scratch this one read
                tl.debug_barrier()
        if HAS_D:
            tl.store(pD_ptr + part * Dm + offs_d, _kahan_total(dD_acc, dD_cmp), mask=mask_d)
        if HAS_BIAS:
            tl.store(pbias_ptr + part * Dm + offs_d, _kahan_total(dbias_acc, dbias_cmp), mask=mask_d)
