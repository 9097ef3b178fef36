"""Triton backend of the four-direction 2D selective scan (SPEC.md section 1).

Layering: the kernels (``_triton_kernels``) -> launchers here -> torch.library custom ops
``vmambax::ss2d_triton_fwd`` / ``ss2d_triton_lowrank_fwd`` (autograd registered, backward through
``vmambax::ss2d_triton_bwd``) -> ``selective_scan_2d`` / ``selective_scan_2d_lowrank`` called by
the public interface after it validated the arguments. Runs on CUDA GPUs, or on CPU tensors
under ``TRITON_INTERPRET=1`` (tests; milliseconds per program step).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .._triton_env import availability, interpreting, patch_interpreter  # noqa: F401  (backend API)

from .flops import register_scan_flops

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernels():
    # Imported on first launch, not with this module: Triton decides between compiling and
    # interpreting when the kernels are defined, and tests set TRITON_INTERPRET before that.
    from . import _triton_kernels
    if interpreting():
        _vectorise_interpreter_scan()
        patch_interpreter()
    return _triton_kernels


def _vectorise_interpreter_scan() -> None:
    """Make the interpreter's generic associative_scan loop over the scanned axis only.

    Triton 3.6's interpreter calls the combine function once per element (about 50 us each), which
    put a single CPU test case over a minute. The combine functions are elementwise, so applying
    them to whole slices along the axis gives the same values. Falls back silently to the stock
    implementation if the interpreter's internals change.
    """
    try:
        import numpy as np
        from triton.runtime import interpreter
        ops = interpreter.ScanOps
    except (ImportError, AttributeError):
        return
    if getattr(ops, "_vmambax_vectorised", False) or not hasattr(ops, "generic_scan"):
        return

    def generic_scan(self, input):
        datas = [arg.handle.data for arg in input]
        outs = [np.empty_like(d) for d in datas]
        acc = None
        for i in range(datas[0].shape[self.axis]):
            cur = tuple(self.to_tensor(np.take(d, i, axis=self.axis), arg.dtype) for d, arg in zip(datas, input))
            if acc is None:
                acc = cur
            else:
                ret = self.combine_fn.fn(*acc, *cur)
                acc = ret if isinstance(ret, tuple) else (ret,)
            index = (slice(None),) * self.axis + (i,)
            for o, a in zip(outs, acc):
                o[index] = a.handle.data
        return [self.to_tensor(o, arg.dtype) for o, arg in zip(outs, input)]

    ops.generic_scan = generic_scan
    ops._vmambax_vectorised = True


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

class _Config(NamedTuple):
    BLOCK_D: int        # channels per forward program
    BLOCK_D_BWD: int    # channels per backward program (its tiles hold ~3x more live values)
    T: int              # positions per chunk (shared: the saved states are per chunk)
    NP: int
    RP: int
    BPP: int            # planes per program
    fwd_warps: int
    bwd_warps: int
    seq: bool           # forward: one thread per channel walking its steps (else the [T, BLOCK_D, NP] tile)
    SEQ_D: int          # channels per program of the sequential forward (32 per warp)
    TC: int             # steps per chunk of the sequential forward (a multiple of T)
    SEQ_BPP: int        # planes per program of the sequential forward (and backward)
    bwd_seq: bool       # backward: one thread per channel (_ss2d_bwd_seq_kernel; else the tile backward)


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# Tile [T, BLOCK_D, NP]: one thread per (channel, state), the chunk's T steps in its registers
# (see _triton_kernels), so warps = BLOCK_D * NP / 32. Registers (ptxas, sm_90a, N=16, T=16,
# bf16, low-rank): forward BLOCK_D=16 takes 123 and spills nothing; backward BLOCK_D=8 takes
# 255 and spills 48 bytes. H100 timings of the alternatives: main() with --sweep (see git log).
# _CONFIG_OVERRIDE replaces entries for that sweep.
_DEFAULTS = dict(BLOCK_D=16, BLOCK_D_BWD=8, T=16, fwd_warps=0, bwd_warps=0, planes_positions=256,
                 fwd="seq", seq_d=32, seq_programs=8192, seq_planes_positions=512, seq_maxnreg=0,
                 bwd="auto", seq_tc=0, bwd_seq_maxnreg=0)
# bwd: "seq" (sequential backward), "tile" (chunked tiles), "auto" = seq for N <= 16. H100 bf16,
# scope core, fwd+bwd: seq/tile enc1 23.0/46.0 ms, rect1 20.1/34.7, dcim_inner1 16.1/37.5, dec3
# 15.4/20.5 (same run). N > 16 stays on tile: seq spills there (NOTES) and was not timed.
# seq_tc forces the steps per chunk of the sequential kernels (tests: several chunks on tiny planes).
# bwd_seq_maxnreg 0: the register cap of the sequential backward by NP (_BWD_SEQ_MAXNREG; none for the
# NP not listed). The one-warp programs are latency-bound (Nsight Compute, enc1 bf16: 2 warps per
# scheduler at 255 registers), and a cap that buys more resident warps paid despite its spills. H200,
# scope core bf16 fwd+bwd at d3289f8, one call: enc1 (NP 16) 20.63 ms uncapped, 20.06 at 168, 21.59 at
# 200, 20.38 at 128; dec3 (NP 4) 13.11 uncapped (254 registers low-rank), 12.60 at 128, 13.12 at 168.
_BWD_SEQ_MAXNREG = {4: 128, 16: 168}
# Steps per segment (T) of the sequential kernels by NP, where the forward and the backward are both
# sequential and no override names T: the backward replays and walks back one T-step segment at a
# time, so longer segments mean fewer segment ends (the d dt / dW tile, dA's read-modify-write, three
# barriers). H200, scope core bf16 fwd+bwd at b7de983, one call: dec3 (NP 4) 12.62 ms at T 16, 11.85
# at 32, 11.98 at 8; enc1 (NP 16) 20.11 at 16, 20.08 at 32, 20.71 at 8, so NP 16 keeps 16.
_SEQ_T = {4: 32}
# VMAMBAX_TRITON_CONFIG (a JSON dict, e.g. '{"bwd": "seq"}') sets overrides for a whole process, so
# benchmark scripts that only call the public API can time a variant.
_CONFIG_OVERRIDE: dict = {}
if os.environ.get("VMAMBAX_TRITON_CONFIG"):
    import json as _json
    _CONFIG_OVERRIDE.update(_json.loads(os.environ["VMAMBAX_TRITON_CONFIG"]))


def _opt(name):
    return _CONFIG_OVERRIDE.get(name, _DEFAULTS[name])


def config(Bt: int, Dm: int, L: int, N: int, R: int) -> _Config:
    NP = max(2, _pow2(N))
    RP = max(2, _pow2(R))
    T = _opt("T")
    if "T" not in _CONFIG_OVERRIDE and _opt("fwd") == "seq" and _wants_seq_bwd(NP):
        T = _SEQ_T.get(NP, T)
    # the same tile size whatever N: wider channel blocks for small states, narrower for large
    bd = max(8, min(_opt("BLOCK_D") * 16 // NP, 64, _pow2(Dm)))
    bdb = max(8, min(_opt("BLOCK_D_BWD") * 16 // NP, 64, _pow2(Dm)))
    if interpreting():   # half the programs, half the CI time; n1/col still take BLOCK_D = 8
        bdb = bd
    n_db = -(-Dm // bd)
    # Several planes per program when planes are short (DCIM's 4x4 windows), as long as enough
    # programs remain to fill the GPU. The interpreter runs programs one after another: there,
    # fewer programs only save time.
    min_programs = 1 if interpreting() else 4096
    bpp = max(1, min(Bt, _opt("planes_positions") // L))
    while bpp > 1 and n_db * 4 * -(-Bt // bpp) < min_programs:
        bpp //= 2
    fw = _opt("fwd_warps") or max(1, min(16, bd * NP // 32))
    bw = _opt("bwd_warps") or max(1, min(16, bdb * NP // 32))
    # Sequential forward: chunks of TC steps, as many as it takes to reach seq_programs programs
    # (1 warp each at seq_d = 32); the fold of earlier chunks costs n_ck / 2 exps per state and
    # program against TC per chunk, so chunks stay long where the grid is already full.
    sd = max(8, min(_opt("seq_d"), _pow2(Dm)))
    n_sdb = -(-Dm // sd)
    min_programs = 1 if interpreting() else _opt("seq_programs")
    sbpp = max(1, min(Bt, _opt("seq_planes_positions") // L))
    while sbpp > 1 and n_sdb * 4 * -(-Bt // sbpp) < min_programs:
        sbpp //= 2
    n_ck = max(1, min(-(-L // T), -(-min_programs // (n_sdb * 4 * -(-Bt // sbpp)))))
    TC = -(-(-(-L // n_ck)) // T) * T
    if _opt("seq_tc"):
        TC = -(-_opt("seq_tc") // T) * T
    return _Config(bd, bdb, T, NP, RP, bpp, fw, bw, _opt("fwd") == "seq", sd, TC, sbpp, _wants_seq_bwd(NP))


def _wants_seq_bwd(NP: int) -> bool:
    return _opt("bwd") == "seq" or (_opt("bwd") == "auto" and NP <= 16)


def _n_chunks(L: int, cfg: _Config) -> int:
    return -(-L // cfg.T)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _plane_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index position p = h*W + w as offset p from a plane's start; other strides free."""
    H, W = x.shape[-2:]
    if (W == 1 or x.stride(-1) == 1) and (H == 1 or x.stride(-2) == W):
        return x
    return x.contiguous()


def _sizes(u, dl, w, A):
    """(Bt, Dm, H, W, N, L, R) and the launch config, shared by the forward and backward launchers."""
    Bt, Dm, H, W = u.shape
    N, L = A.shape[-1], H * W
    R = dl.shape[2] if w is not None else 0
    return Bt, Dm, H, W, N, L, R, config(Bt, Dm, L, N, R)


def _fwd(u, dl, w, A, B, C, D, bias, softplus, out_dtype, save):
    kern = _kernels()
    Bt, Dm, H, W, N, L, R, cfg = _sizes(u, dl, w, A)
    n_chunks, n_db = _n_chunks(L, cfg), -(-Dm // cfg.BLOCK_D)
    u, dl, B, C = map(_plane_contiguous, (u, dl, B, C))
    A, w, D, bias = (None if t is None else t.contiguous() for t in (A, w, D, bias))
    # The sums that atomics build in an order that varies between runs (y here; du, dB, dC and the
    # low-rank d dt in the backward) are float64 buffers that the kernels add their fp32 values
    # into, rounded once at the end. Why: with fp32 buffers the results varied from run to run on a
    # GPU, and the whole-model rule test (tests/models/test_gpu.py) missed with triton on a few
    # gradients, different ones each run (1.07x and 1.75x in one run, 1.15x and 1.02x in another),
    # while every Triton module alone kept the rule (worst ratio 0.54). Four fp32 addends (y, du)
    # sum exactly in float64, so those do not depend on the order; dB, dC, d dt (more addends)
    # round to the same value whatever the order except in rare ties.
    y = torch.zeros(u.shape, dtype=torch.float64, device=u.device)
    states = (torch.empty((Bt, 4, n_chunks, N, Dm), dtype=torch.float32, device=u.device) if save
              else torch.empty(0, dtype=torch.float32, device=u.device))
    if cfg.seq:
        _fwd_seq(kern, cfg, u, dl, w, A, B, C, D, bias, softplus, y, states, save)
        return y.to(out_dtype), states
    grid = (n_db * -(-Bt // cfg.BPP), 4)
    At = A.transpose(1, 2).contiguous()   # the tile forward reads A as (4, N, Dm), as the sequential one
    kern._ss2d_fwd_kernel[grid](
        u, dl, w if w is not None else A, At, B, C, D if D is not None else A, bias if bias is not None else A,
        y, states,
        Bt, Dm, H, W, L, N, R, n_db, n_chunks, cfg.BPP,
        u.stride(0), u.stride(1), dl.stride(0), dl.stride(1), dl.stride(2),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        BLOCK_D=cfg.BLOCK_D, T=cfg.T, NP=cfg.NP, RP=cfg.RP,
        LOWRANK=w is not None, HAS_D=D is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        SAVE=save, INTERP=interpreting(), num_warps=cfg.fwd_warps,
    )
    return y.to(out_dtype), states


def _fwd_seq(kern, cfg, u, dl, w, A, B, C, D, bias, softplus, y, states, save):
    """Two launches: chunk end states (only when a plane has several chunks), then the output."""
    Bt, Dm, H, W = u.shape
    N, L = A.shape[-1], H * W
    R = dl.shape[2] if w is not None else 0
    n_db, n_ck = -(-Dm // cfg.SEQ_D), -(-L // cfg.TC)
    # (Bt, 4, L, N|R) copies: one step's values contiguous (see _seq_step)
    B, C = (t.flatten(3).transpose(2, 3).contiguous() for t in (B, C))
    if w is not None:
        dl = dl.flatten(3).transpose(2, 3).contiguous()
    f32 = dict(dtype=torch.float32, device=u.device)
    # he and S are fp32 and not read with one chunk; their dummy is fp32 too (y is float64), so the
    # kernel's types do not depend on n_ck
    dummy = torch.empty(1, **f32) if n_ck == 1 else None
    he = torch.empty((Bt, 4, n_ck, N, Dm), **f32) if n_ck > 1 else dummy
    At = A.transpose(1, 2).contiguous()                                    # (4, N, Dm)
    wt = w.transpose(1, 2).contiguous() if w is not None else At           # (4, R, Dm)
    S = torch.empty((Bt, 4, n_ck, Dm), **f32) if n_ck > 1 else dummy
    args = [u, dl, wt, At, B, C, D if D is not None else A, bias if bias is not None else A,
            y, states, he, S, Bt, Dm, H, W, L, N, R, n_db, n_ck, cfg.TC, cfg.SEQ_BPP, _n_chunks(L, cfg),
            u.stride(0), u.stride(1), dl.stride(0), dl.stride(1), dl.stride(2), 1]
    meta = dict(BLOCK_D=cfg.SEQ_D, NP=cfg.NP, RP=cfg.RP, TS=cfg.T, LOWRANK=w is not None, HAS_D=D is not None,
                HAS_BIAS=bias is not None, SOFTPLUS=softplus, SAVE=save, INTERP=interpreting(),
                num_warps=max(1, cfg.SEQ_D // 32))
    if _opt("seq_maxnreg"):
        meta["maxnreg"] = _opt("seq_maxnreg")
    nb = -(-Bt // cfg.SEQ_BPP)
    if n_ck > 1:   # the last chunk's end state is never used
        kern._ss2d_fwd_seq_kernel[(n_db * (n_ck - 1), nb, 4)](*args, PHASE=0, **meta)
    kern._ss2d_fwd_seq_kernel[(n_db * n_ck, nb, 4)](*args, PHASE=1, **meta)


def _bwd(gy, u, dl, w, A, B, C, D, bias, states, softplus):
    kern = _kernels()
    Bt, Dm, H, W, N, L, R, cfg = _sizes(u, dl, w, A)
    n_chunks, n_db = _n_chunks(L, cfg), -(-Dm // cfg.BLOCK_D_BWD)
    if states.shape != (Bt, 4, n_chunks, N, Dm):
        raise RuntimeError("ss2d_triton_bwd: the forward did not save its chunk states "
                           f"(got states of shape {tuple(states.shape)}); call it with save_states=True")
    gy, u, dl, B, C = map(_plane_contiguous, (gy, u, dl, B, C))
    A, w, D, bias = (None if t is None else t.contiguous() for t in (A, w, D, bias))
    if cfg.bwd_seq:
        return _bwd_seq(kern, cfg, gy, u, dl, w, A, B, C, D, bias, states, softplus)
    # float64 sums of the atomics (du, the low-rank d dt, dB, dC), rounded once at the end: see _fwd
    f64 = dict(dtype=torch.float64, device=u.device)
    du = torch.zeros(u.shape, **f64)
    ddl = torch.zeros(dl.shape, **f64) if w is not None else torch.empty(dl.shape, dtype=dl.dtype, device=u.device)
    dB = torch.zeros(B.shape, **f64)
    dC = torch.zeros(C.shape, **f64)
    # parameter partials: one float64 row per plane group, every element written by one program
    n_pg = -(-Bt // cfg.BPP)
    pA = torch.empty((n_pg, *A.shape), **f64)
    pD = torch.empty((n_pg, 4, Dm), **f64) if D is not None else pA
    pbias = torch.empty((n_pg, 4, Dm), **f64) if bias is not None else pA
    pw = torch.empty((n_pg, *w.shape), **f64) if w is not None else pA
    grid = (n_db * n_pg, 4)
    kern._ss2d_bwd_kernel[grid](
        u, dl, w if w is not None else A, A, B, C, D if D is not None else A, bias if bias is not None else A,
        states, gy, du, ddl, pA, dB, dC, pD, pbias, pw,
        Bt, Dm, H, W, L, N, R, n_db, n_chunks, cfg.BPP,
        u.stride(0), u.stride(1), dl.stride(0), dl.stride(1), dl.stride(2),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2), gy.stride(0), gy.stride(1),
        BLOCK_D=cfg.BLOCK_D_BWD, T=cfg.T, NP=cfg.NP, RP=cfg.RP,
        LOWRANK=w is not None, HAS_D=D is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        INTERP=interpreting(), num_warps=cfg.bwd_warps,
    )
    dA, dD, dbias, dw = _sum_partials(pA, pD if D is not None else None, pbias if bias is not None else None,
                                      pw if w is not None else None, device=u.device)
    return du.to(u.dtype), ddl.to(dl.dtype), dA, dB.to(B.dtype), dC.to(C.dtype), dD, dbias, dw


def _sum_partials(*parts, device):
    """Sum per-program partial rows over their leading axis in float64, then round once to float32
    (empty for an absent parameter). torch's sum has a fixed order: the gradients are deterministic."""
    return [torch.empty(0, dtype=torch.float32, device=device) if p is None
            else p.sum(0, dtype=torch.float64).float() for p in parts]


def _bwd_seq(kern, cfg, gy, u, dl, w, A, B, C, D, bias, states, softplus):
    """Two launches, as the sequential forward: the adjoint handed across chunks (only when a plane
    has several chunks), then the gradients. Chunks and planes per program as the forward's."""
    Bt, Dm, H, W = u.shape
    N, L = A.shape[-1], H * W
    R = dl.shape[2] if w is not None else 0
    n_db, n_ck, nb = -(-Dm // cfg.SEQ_D), -(-L // cfg.TC), -(-Bt // cfg.SEQ_BPP)
    f32 = dict(dtype=torch.float32, device=u.device)
    # (Bt, 4, L, N|R) copies, as the forward's (one step's values share a sector); dB, dC and the
    # low-rank d dt are accumulated in that layout and transposed back at the end
    Bq, Cq = (t.flatten(3).transpose(2, 3).contiguous() for t in (B, C))
    dlq = dl.flatten(3).transpose(2, 3).contiguous() if w is not None else dl
    At = A.transpose(1, 2).contiguous()                                    # (4, N, Dm)
    wt = w.transpose(1, 2).contiguous() if w is not None else At           # (4, R, Dm)
    # float64 sums of the atomics (du, dB, dC, the low-rank d dt), rounded once at the end: see
    # _fwd. The plain form's d delta is stored, not added: it stays fp32.
    f64 = dict(dtype=torch.float64, device=u.device)
    du = torch.zeros(u.shape, **f64)
    dB = torch.zeros((Bt, 4, L, N), **f64)
    dC = torch.zeros((Bt, 4, L, N), **f64)
    ddl = torch.zeros((Bt, 4, L, R), **f64) if w is not None else torch.empty(dl.shape, **f32)
    # ge and S are fp32 and not read with one chunk: an fp32 dummy then (du is float64)
    dummy = torch.empty(1, **f32) if n_ck == 1 else None
    ge = torch.empty((Bt, 4, n_ck, N, Dm), **f32) if n_ck > 1 else dummy
    S = torch.empty((Bt, 4, n_ck, Dm), **f32) if n_ck > 1 else dummy
    grid = (n_db * n_ck, nb, 4)
    n_parts = n_ck * nb
    scratch = torch.empty(n_parts * 4 * cfg.T * (N + 3) * Dm, **f32)
    pA = torch.zeros((n_parts, 4, N, Dm), **f32)      # added into per segment (fp32: see the kernel)
    pD = torch.empty((n_parts, 4, Dm), **f64) if D is not None else pA
    pbias = torch.empty((n_parts, 4, Dm), **f64) if bias is not None else pA
    pw = torch.zeros((n_parts, 4, R, Dm), **f32) if w is not None else pA
    args = [u, dlq, wt, At, Bq, Cq, D if D is not None else A, bias if bias is not None else A, states, gy,
            ge, S, scratch, du, ddl, dB, dC, pA, pD, pbias, pw,
            Bt, Dm, H, W, L, N, R, n_db, n_ck, cfg.TC, cfg.SEQ_BPP, _n_chunks(L, cfg),
            u.stride(0), u.stride(1), dlq.stride(0), dlq.stride(1), dlq.stride(2), gy.stride(0), gy.stride(1), 1]
    meta = dict(BLOCK_D=cfg.SEQ_D, NP=cfg.NP, RP=cfg.RP, TS=cfg.T, LOWRANK=w is not None, HAS_D=D is not None,
                HAS_BIAS=bias is not None, SOFTPLUS=softplus, INTERP=interpreting(),
                num_warps=max(1, cfg.SEQ_D // 32))
    maxnreg = _opt("bwd_seq_maxnreg") or _BWD_SEQ_MAXNREG.get(cfg.NP, 0)
    if maxnreg:
        meta["maxnreg"] = maxnreg
    if n_ck > 1:   # chunk 0 hands nothing on
        kern._ss2d_bwd_seq_kernel[(n_db * (n_ck - 1), nb, 4)](*args, PHASE=0, **meta)
    kern._ss2d_bwd_seq_kernel[grid](*args, PHASE=1, **meta)
    # parameter partials: one row per (chunk, plane block) and walk, summed here in float64
    dA, dD, dbias, dw = _sum_partials(pA, pD if D is not None else None, pbias if bias is not None else None,
                                      pw if w is not None else None, device=u.device)
    dA = dA.transpose(1, 2)                                                 # (4, Dm, N)
    if w is not None:
        dw = dw.transpose(1, 2)
    dB = dB.transpose(2, 3).reshape(B.shape)
    dC = dC.transpose(2, 3).reshape(C.shape)
    if w is not None:
        ddl = ddl.transpose(2, 3).reshape(dl.shape)
    def dense(t, dtype):   # one copy into the contiguous layout the fake implementation gives
        return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)
    return (du.to(u.dtype), dense(ddl, dl.dtype), dA.contiguous(), dense(dB, B.dtype), dense(dC, C.dtype),
            dD, dbias, dw.contiguous())


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------

def _states_shape(u, A, R, save):
    # shape arithmetic only (T does not depend on the shape), so symbolic shapes trace through
    Bt, Dm, H, W = u.shape
    if not save:
        return (0,)
    T = _opt("T")
    return (Bt, 4, (H * W + T - 1) // T, A.shape[-1], Dm)


@torch.library.custom_op("vmambax::ss2d_triton_fwd", mutates_args=())
def _fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool,
            out_dtype: torch.dtype, save_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(u, delta, None, A, B, C, D, delta_bias, delta_softplus, out_dtype, save_states)


@torch.library.custom_op("vmambax::ss2d_triton_lowrank_fwd", mutates_args=())
def _lowrank_fwd_op(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: torch.Tensor | None, delta_bias: torch.Tensor | None, dt_projs_weight: torch.Tensor,
                    delta_softplus: bool, out_dtype: torch.dtype,
                    save_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(u, dt, dt_projs_weight, A, B, C, D, delta_bias, delta_softplus, out_dtype, save_states)


@torch.library.custom_op("vmambax::ss2d_triton_bwd", mutates_args=())
def _bwd_op(grad_y: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
            C: torch.Tensor, D: torch.Tensor | None, delta_bias: torch.Tensor | None,
            dt_projs_weight: torch.Tensor | None, states: torch.Tensor,
            delta_softplus: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (du, d delta|d dt, dA, dB, dC, dD, d delta_bias, d dt_projs_weight); empty for absent inputs."""
    return _bwd(grad_y, u, delta, dt_projs_weight, A, B, C, D, delta_bias, states, delta_softplus)


@_fwd_op.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype, save_states):
    return (u.new_empty(u.shape, dtype=out_dtype),
            u.new_empty(_states_shape(u, A, 0, save_states), dtype=torch.float32))


@_lowrank_fwd_op.register_fake
def _(u, dt, A, B, C, D, delta_bias, dt_projs_weight, delta_softplus, out_dtype, save_states):
    return (u.new_empty(u.shape, dtype=out_dtype),
            u.new_empty(_states_shape(u, A, dt.shape[2], save_states), dtype=torch.float32))


@_bwd_op.register_fake
def _(grad_y, u, delta, A, B, C, D, delta_bias, dt_projs_weight, states, delta_softplus):
    f32 = dict(dtype=torch.float32)
    empty = u.new_empty(0, **f32)
    # contiguous, as _bwd allocates them (empty_like would copy a permuted input's strides)
    return (u.new_empty(u.shape), delta.new_empty(delta.shape), A.new_empty(A.shape, **f32), B.new_empty(B.shape),
            C.new_empty(C.shape), empty if D is None else D.new_empty(D.shape, **f32),
            empty if delta_bias is None else delta_bias.new_empty(delta_bias.shape, **f32),
            empty if dt_projs_weight is None else dt_projs_weight.new_empty(dt_projs_weight.shape, **f32))


def _setup(ctx, inputs, output, lowrank):
    u, dl, A, B, C, D, bias = inputs[:7]
    w = inputs[7] if lowrank else None
    ctx.save_for_backward(u, dl, A, B, C, D, bias, w, output[1])
    ctx.softplus = inputs[8] if lowrank else inputs[7]


def _backward(ctx, grad_y, _grad_states, lowrank):
    u, dl, A, B, C, D, bias, w, states = ctx.saved_tensors
    du, ddl, dA, dB, dC, dD, dbias, dw = _bwd_op(grad_y, u, dl, A, B, C, D, bias, w, states, ctx.softplus)
    dD = None if D is None else dD
    dbias = None if bias is None else dbias
    if lowrank:
        return du, ddl, dA, dB, dC, dD, dbias, dw, None, None, None
    return du, ddl, dA, dB, dC, dD, dbias, None, None, None


_fwd_op.register_autograd(lambda ctx, gy, gs: _backward(ctx, gy, gs, False),
                          setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, False))
_lowrank_fwd_op.register_autograd(lambda ctx, gy, gs: _backward(ctx, gy, gs, True),
                                  setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, True))
register_scan_flops(torch.ops.vmambax.ss2d_triton_fwd, lowrank=False)
register_scan_flops(torch.ops.vmambax.ss2d_triton_lowrank_fwd, lowrank=True)


# ----------------------------------------------------------------------------------------------
# Backend entry points (called by selective_scan/interface.py after validation)
# ----------------------------------------------------------------------------------------------

def _check(u, device_tensors: dict, lowrank_args=None):
    if u.dtype not in _DTYPES:
        raise TypeError(f"u: expected float32, bfloat16 or float16 for the triton backend, got {u.dtype}")
    for name, t in device_tensors.items():
        if t is not None and t.device != u.device:
            raise ValueError(f"{name}: expected device {u.device} (the device of u), got {t.device}")
    if u.device.type != "cuda" and not interpreting():
        raise ValueError(f"u: the triton backend expects CUDA tensors (or TRITON_INTERPRET=1), got {u.device}")
    if lowrank_args is not None:
        dt, w = lowrank_args
        Bt, Dm, H, W = u.shape
        if dt.dim() != 5 or dt.shape[:2] != (Bt, 4) or dt.shape[3:] != (H, W):
            raise ValueError(f"dt: expected shape ({Bt}, 4, R, {H}, {W}), got {tuple(dt.shape)}")
        if dt.dtype != u.dtype:
            raise TypeError(f"dt: expected dtype {u.dtype} (the dtype of u), got {dt.dtype}")
        R = dt.shape[2]
        if tuple(w.shape) != (4, Dm, R):
            raise ValueError(f"dt_projs_weight: expected shape (4, {Dm}, {R}), got {tuple(w.shape)}")


def _needs_states(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _params(*ps):
    return [None if p is None else p.float() for p in ps]


def selective_scan_2d(u, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype):
    """y (Bt, Dm, H, W) in out_dtype; shapes and gradients as ``reference.selective_scan_2d``."""
    _check(u, {"delta": delta, "A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias})
    A, D, delta_bias = _params(A, D, delta_bias)
    save = _needs_states(u, delta, A, B, C, D, delta_bias)
    y, _ = torch.ops.vmambax.ss2d_triton_fwd(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), out_dtype, save)
    return y


def selective_scan_2d_lowrank(u, dt, dt_projs_weight, A, B, C, D, delta_bias, delta_softplus, out_dtype):
    """y (Bt, Dm, H, W); delta = dt_projs_weight @ dt formed inside the kernels in fp32.

    dt (Bt, 4, R, H, W) in u's dtype, dt_projs_weight (4, Dm, R) fp32; dt, B, C may be strided
    views (only each H*W plane must be contiguous). Spec: ``reference.selective_scan_2d_lowrank``.
    """
    _check(u, {"dt": dt, "dt_projs_weight": dt_projs_weight, "A": A, "B": B, "C": C, "D": D,
               "delta_bias": delta_bias}, (dt, dt_projs_weight))
    A, D, delta_bias, w = _params(A, D, delta_bias, dt_projs_weight)
    save = _needs_states(u, dt, w, A, B, C, D, delta_bias)
    y, _ = torch.ops.vmambax.ss2d_triton_lowrank_fwd(u, dt, A, B, C, D, delta_bias, w, bool(delta_softplus),
                                                     out_dtype, save)
    return y


# ----------------------------------------------------------------------------------------------
# Timing and tuning sweep on a GPU (main() below)
# ----------------------------------------------------------------------------------------------

def _time_cases(cases=("enc1", "dcim_inner1", "dec3", "rect1")):
    """Print fwd / fwd+bwd ms of scope "core" (cross_selective_scan_2d + LayerNorm, bf16 x) for
    each case, and the unfused mamba-ssm path of the same run where mamba-ssm is installed."""
    import math
    from triton.testing import do_bench
    from .. import cross_selective_scan_2d
    from ..testing import SHAPES
    rows = []
    for name in cases:
        c = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        dev = dict(device="cuda")
        x = torch.randn(c.Bt, c.Dm, c.H, c.W, generator=g, **dev).bfloat16()
        params = [torch.randn(4, c.R + 2 * c.N, c.Dm, generator=g, **dev) * c.Dm ** -0.5,
                  torch.rand(4, c.Dm, c.R, generator=g, **dev) * c.R ** -0.5,
                  torch.full((4, c.Dm), math.log(math.expm1(0.01)), **dev),
                  torch.log(torch.arange(1, c.N + 1, **dev).float()).repeat(4 * c.Dm, 1),
                  torch.ones(4 * c.Dm, **dev)]
        leaves = [x.requires_grad_()] + [p.requires_grad_() for p in params]
        gy = torch.randn(c.Bt, c.H, c.W, c.Dm, generator=g, **dev)

        def core(fn):
            y = fn(*leaves).permute(0, 2, 3, 1)
            return torch.nn.functional.layer_norm(y, (c.Dm,))

        for prov, fn in (("triton", lambda *a: cross_selective_scan_2d(*a, backend="triton")),
                         ("unfused_mamba", _unfused_mamba)):
            if fn is None:
                continue
            with torch.no_grad():
                fwd = do_bench(lambda: core(fn), warmup=25, rep=100, return_mode="median")
            fb = do_bench(lambda: core(fn).backward(gy), warmup=25, rep=100, return_mode="median",
                          grad_to_none=leaves)
            rows.append((name, prov, fwd, fb))
            print(f"core {name:12s} {prov:14s} fwd {fwd:8.3f} ms  fwd+bwd {fb:8.3f} ms", flush=True)
    return rows


def _unfused_mamba_fn():
    """VMamba's unfused path: torch cross-scan, mamba-ssm's 1D selective scan, torch cross-merge."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None

    def fn(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
        Bt, Dm, H, W = x.shape
        L, R, N = H * W, dt_projs_weight.shape[2], A_logs.shape[1]
        xhw = x.flatten(2)
        xwh = x.transpose(2, 3).flatten(2)
        xs = torch.stack([xhw, xwh, xhw.flip(-1), xwh.flip(-1)], 1)            # (Bt, 4, Dm, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight.to(xs.dtype))
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight.to(dts.dtype))
        ys = selective_scan_fn(xs.reshape(Bt, -1, L), dts.reshape(Bt, -1, L), -torch.exp(A_logs.float()),
                               Bs, Cs, Ds.float(), delta_bias=dt_projs_bias.float().flatten(),
                               delta_softplus=True).view(Bt, 4, Dm, L).float()
        y = ys[:, 0] + ys[:, 2].flip(-1)
        y = y + (ys[:, 1] + ys[:, 3].flip(-1)).view(Bt, Dm, W, H).transpose(2, 3).reshape(Bt, Dm, L)
        return y.view(Bt, Dm, H, W)
    return fn


_unfused_mamba = None


def main(argv=None):
    """Timing/tuning on a GPU (not ``python -m``: that would register the ops twice):
    python -c "from vmambax_kernels.selective_scan.triton import main; main()" [--sweep JSON]"""
    import argparse
    import json
    global _unfused_mamba
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--sweep", default=os.environ.get("VMAMBAX_TRITON_SWEEP", ""),
                    help="JSON list of _CONFIG_OVERRIDE dicts to time in turn")
    ap.add_argument("--cases", default="enc1,dcim_inner1,dec3,rect1")
    args = ap.parse_args(argv)
    print(torch.cuda.get_device_name(), flush=True)
    _unfused_mamba = _unfused_mamba_fn()
    for override in json.loads(args.sweep) if args.sweep else [{}]:
        _CONFIG_OVERRIDE.clear()
        _CONFIG_OVERRIDE.update(override)
        print("config", override or "default", flush=True)
        _time_cases(args.cases.split(","))
        _unfused_mamba = None   # the peer once is enough
