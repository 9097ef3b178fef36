"""CI on CPU: every .cu under csrc/ compiles with nvcc against torch's headers (no GPU needed).

The fast test stops at unoptimised PTX (nvcc's front end, template instantiation and code
generation; -Xcicc -O0, no ptxas: ~5 s a file instead of ~60 s on 2 cores) so the whole set fits
the CPU budget; the slow one builds optimised sm_90 machine code and reports registers and spills.
torch's CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h: a one-line stand-in is generated.

Also here, since it needs no GPU either: a float64 transcription of the kernels' index logic, the
batched carry passes, the warp reduce-scatter of dB / dC and the backward main pass's shared slots,
checked against the reference scan and its autograd.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from csrc_build import NVCC_FLAGS, cxx_runtime_link_args  # noqa: E402

NVCC = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))
needs_nvcc = pytest.mark.skipif(not Path(NVCC).exists(), reason="nvcc not found: install the CUDA toolkit")


def _includes(tmp: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths
    stand_in = tmp / "c10" / "cuda" / "impl"
    stand_in.mkdir(parents=True, exist_ok=True)
    (stand_in / "cuda_cmake_macros.h").write_text("#pragma once\n")
    return [f"-I{p}" for p in [*include_paths(), str(tmp), str(ROOT / "csrc")]]


def _compile(cu: Path, out: Path, includes: list[str], gencode: list[str], extra=()) -> subprocess.CompletedProcess:
    cmd = [NVCC, "-c", str(cu), "-o", str(out), *NVCC_FLAGS, *gencode, *includes, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _compile_all(tmp_path, gencode, extra=()):
    includes = _includes(tmp_path)
    with ThreadPoolExecutor(max_workers=2) as pool:  # 2 cores here
        results = list(pool.map(lambda cu: (cu, _compile(cu, tmp_path / (cu.stem + ".o"), includes, gencode, extra)),
                                CU_FILES))
    failed = [f"{cu.relative_to(ROOT)}:\n{r.stderr[-3000:]}" for cu, r in results if r.returncode != 0]
    assert not failed, "nvcc failed:\n" + "\n".join(failed)
    return results


@needs_nvcc
def test_there_are_kernels():
    assert len(CU_FILES) >= 6, [str(p) for p in CU_FILES]


def test_static_only_compiler_links_the_loaded_cxx_runtime(tmp_path):
    """A g++ with libstdc++.a only (as on the GPU machine) would put a second C++ runtime into the
    extension, where every TORCH_CHECK message with a number crashed: the link names torch's."""
    import torch  # noqa: F401  (maps the libstdc++ torch runs with)
    static_only = tmp_path / "g++"
    static_only.write_text("#!/bin/sh\necho libstdc++.so\n")  # what g++ prints when it has no .so
    static_only.chmod(0o755)
    args = cxx_runtime_link_args([str(static_only)])
    assert len(args) == 1 and Path(args[0]).name.startswith("libstdc++.so.6") and Path(args[0]).exists(), args
    shared = tmp_path / "shared-g++"
    shared.write_text(f"#!/bin/sh\necho {args[0]}\n")  # a compiler that links the shared runtime itself
    shared.chmod(0o755)
    assert cxx_runtime_link_args([str(shared)]) == []


@needs_nvcc
@pytest.mark.timeout(120)
def test_every_cu_compiles_to_ptx(tmp_path):
    """Front end + PTX for compute_80 and compute_90 (CUDA 13; no CCCL API that CCCL 3 removed)."""
    _compile_all(tmp_path, ["-gencode", "arch=compute_80,code=compute_80", "-gencode", "arch=compute_90,code=compute_90"],
                 ["-Xcicc", "-O0"])
    for cu in CU_FILES + sorted((ROOT / "csrc").rglob("*.cuh")) + sorted((ROOT / "csrc").rglob("*.h")):
        text = cu.read_text()
        for removed in ("cub::LaneId", "cub::CTA_SYNC", "cub::WARP_SYNC"):
            assert removed not in text, f"{cu.name} uses {removed}, removed in CCCL 3"


@needs_nvcc
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_cu_assembles_for_sm90(tmp_path):
    """Full sm_90 build with ptxas' resource report (registers, spills) printed for the notes."""
    results = _compile_all(tmp_path, ["-gencode", "arch=compute_90,code=sm_90"], ["-Xptxas", "-v"])
    for cu, r in results:
        report = [ln for ln in r.stderr.splitlines() if "registers" in ln or "spill" in ln]
        print(cu.name, *report, sep="\n  ")


# ---- index logic, transcribed in float64 (csrc/selective_scan: *_carry_kernel, bwd_subtile) ----

def _reduce_scatter32(v):
    """warp_reduce_scatter32: v[lane][row] (32 x 32) -> lane l's result; step OFF, lane keeps the
    half of its rows named by its bit OFF and adds the partner's copy of that half."""
    v = [list(r) for r in v]
    for off in (16, 8, 4, 2, 1):
        new = [r[:] for r in v]
        for lane in range(32):
            up, partner = bool(lane & off), lane ^ off
            for j in range(off):
                send = v[partner][j] if (partner & off) else v[partner][j + off]
                new[lane][j] = (v[lane][j + off] if up else v[lane][j]) + send
        v = new
    return [v[lane][0] for lane in range(32)]


def _carry(buf, sums, A, Bt, Dm, N, nc, G, forward):
    """One thread per (b, k, n, d), line by line as ss2d_{fwd,bwd}_carry_kernel (buf: cE / cQ flat
    [(b*4+k)*nc + c][n][d], sums: cS flat [(b*4+k)*nc + c][d])."""
    for idx in range(Bt * 4 * Dm * N):
        d, n, k, b = idx % Dm, (idx // Dm) % N, (idx // (Dm * N)) % 4, idx // (Dm * N * 4)
        A2 = float(A[k, d, n]) / math.log(2)
        row0, es = (b * 4 + k) * nc, N * Dm
        e0, s0, h = (row0 * N + n) * Dm + d, row0 * Dm + d, 0.0
        for j0 in range(0, nc, G):
            ev, sv = [0.0] * G, [0.0] * G
            for i in range(G):
                j = j0 + i if forward else nc - 1 - (j0 + i)
                c = j if k < 2 else nc - 1 - j
                on = j < nc - 1 if forward else j > 0
                ev[i] = float(buf[e0 + c * es]) if on else 0.0
                sv[i] = float(sums[s0 + c * Dm]) if on else 0.0
                assert not (on and math.isnan(ev[i]))
            for i in range(G):
                j = j0 + i if forward else nc - 1 - (j0 + i)
                c = j if k < 2 else nc - 1 - j
                if (j < nc) if forward else (j >= 0):
                    buf[e0 + c * es] = h
                h = 2.0 ** (A2 * sv[i]) * h + ev[i]


def _transcribed_scan(Bt, Dm, H, W, N, T, G, seed):
    """Forward (chunk, carry, output) and backward (chunk, carry, main with the reduce-scatter)
    of the kernels' chunk geometry (T positions a chunk, one sub-tile of <= 16) in float64."""
    import torch
    from vmambax_kernels.selective_scan import reference
    f64, L = torch.float64, H * W
    nc = (L + T - 1) // T
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(Bt, Dm, H, W, generator=g, dtype=f64)
    delta = torch.rand(Bt, 4, Dm, H, W, generator=g, dtype=f64) * 0.3 + 0.01
    A = -torch.rand(4, Dm, N, generator=g, dtype=f64) * 2 - 0.1
    B, C = (torch.randn(Bt, 4, N, H, W, generator=g, dtype=f64) for _ in range(2))
    D = torch.randn(4, Dm, generator=g, dtype=f64)
    dy = torch.randn(Bt, Dm, H, W, generator=g, dtype=f64)

    def plane(x, side):  # the side's plane: rows as given, columns transposed (W, H)
        return (x if side == 0 else x.transpose(-1, -2)).reshape(*x.shape[:-2], L)

    def orig_pos(k, tt):
        return (tt % H) * W + tt // H if k & 1 else tt

    def walk(b, k):
        s = k & 1
        return plane(u[b], s), plane(delta[b, k], s), plane(B[b, k], s), plane(C[b, k], s), plane(dy[b], s)

    def steps(c, kk, reverse):
        q0, q1 = c * T, min(c * T + T, L)
        up = list(range(q0, q1))
        return up[::-1] if (kk == 1) != reverse else up

    def col(buf, r):
        return torch.stack([buf[(r * N + n) * Dm:(r * N + n + 1) * Dm] for n in range(N)], 1)

    cE, cQ = (torch.full((Bt * 4 * nc * N * Dm,), math.nan, dtype=f64) for _ in range(2))
    cS, cSb = (torch.full((Bt * 4 * nc * Dm,), math.nan, dtype=f64) for _ in range(2))
    for b in range(Bt):
        for k in range(4):
            us, dls, Bs, Cs, gs = walk(b, k)
            kk = k >> 1
            for c in range(nc):
                r = (b * 4 + k) * nc + c
                if c != (nc - 1 if kk == 0 else 0):  # forward chunk pass: not the walk's last chunk
                    h, S = torch.zeros(Dm, N, dtype=f64), torch.zeros(Dm, dtype=f64)
                    for i in steps(c, kk, False):
                        S += dls[:, i]
                        h = torch.exp(dls[:, i:i + 1] * A[k]) * h + (dls[:, i] * us[:, i])[:, None] * Bs[None, :, i]
                    cS[r * Dm:(r + 1) * Dm] = S
                    for n in range(N):
                        cE[(r * N + n) * Dm:(r * N + n + 1) * Dm] = h[:, n]
                if c != (0 if kk == 0 else nc - 1):  # backward chunk pass: not the walk's first chunk
                    e, S = torch.zeros(Dm, N, dtype=f64), torch.zeros(Dm, dtype=f64)
                    for i in steps(c, kk, True):
                        S += dls[:, i]
                        e = torch.exp(dls[:, i:i + 1] * A[k]) * (Cs[None, :, i] * gs[:, i:i + 1] + e)
                    cSb[r * Dm:(r + 1) * Dm] = S
                    for n in range(N):
                        cQ[(r * N + n) * Dm:(r * N + n + 1) * Dm] = e[:, n]
    _carry(cE, cS, A, Bt, Dm, N, nc, G, forward=True)
    _carry(cQ, cSb, A, Bt, Dm, N, nc, G, forward=False)
    assert not (torch.isnan(cE).any() or torch.isnan(cQ).any())
    y, du = torch.zeros(Bt, Dm, L, dtype=f64), torch.zeros(Bt, Dm, L, dtype=f64)
    ddl, dA, dD = torch.zeros(Bt, 4, Dm, L, dtype=f64), torch.zeros(4, Dm, N, dtype=f64), torch.zeros(4, Dm, dtype=f64)
    dB, dC = torch.zeros(Bt, 4, N, L, dtype=f64), torch.zeros(Bt, 4, N, L, dtype=f64)
    for b in range(Bt):
        for k in range(4):
            us, dls, Bs, Cs, gs = walk(b, k)
            kk = k >> 1
            for c in range(nc):
                r, q0 = (b * 4 + k) * nc + c, c * T
                h, hprev, hs = col(cE, r), {}, {}
                for i in steps(c, kk, False):  # output pass / replay from the entering state
                    hprev[i] = h
                    h = torch.exp(dls[:, i:i + 1] * A[k]) * h + (dls[:, i] * us[:, i])[:, None] * Bs[None, :, i]
                    hs[i] = h
                    y[b, :, orig_pos(k, i)] += (h * Cs[None, :, i]).sum(1) + D[k] * us[:, i]
                en, lanes = col(cQ, r), torch.zeros(32, 32, N, dtype=f64)  # [channel lane][row][n]
                for i in steps(c, kk, True):  # main pass, reverse recurrence from X
                    a = torch.exp(dls[:, i:i + 1] * A[k])
                    dh = Cs[None, :, i] * gs[:, i:i + 1] + en
                    X, t = (dh * Bs[None, :, i]).sum(1), dh * a * hprev[i]
                    dA[k] += t * dls[:, i:i + 1]
                    du[b, :, orig_pos(k, i)] += dls[:, i] * X + D[k] * gs[:, i]
                    ddl[b, k, :, orig_pos(k, i)] += us[:, i] * X + (t * A[k]).sum(1)
                    dD[k] += gs[:, i] * us[:, i]
                    lanes[:Dm, i - q0] = gs[:, i:i + 1] * hs[i]                      # dC rows
                    lanes[:Dm, 16 + i - q0] = dh * (dls[:, i] * us[:, i])[:, None]   # dB rows
                    en = a * dh
                for n in range(N):
                    sums = _reduce_scatter32(lanes[:, :, n].tolist())
                    for ii in range(min(T, L - q0)):
                        dC[b, k, n, orig_pos(k, q0 + ii)] += sums[ii]
                        dB[b, k, n, orig_pos(k, q0 + ii)] += sums[16 + ii]
    leaves = [t.clone().requires_grad_(True) for t in (u, delta, A, B, C, D)]
    ref = reference.selective_scan_2d(*leaves, None, False, f64)
    ref.backward(dy)
    ref = ref.detach()
    errs = {"y": float((y.view_as(ref) - ref).abs().max() / ref.abs().max())}
    for name, mine, leaf in (("du", du, leaves[0]), ("ddelta", ddl, leaves[1]), ("dA", dA, leaves[2]),
                             ("dB", dB, leaves[3]), ("dC", dC, leaves[4]), ("dD", dD, leaves[5])):
        errs[name] = float((mine.view_as(leaf.grad) - leaf.grad).abs().max() / leaf.grad.abs().max())
    return nc, errs


@pytest.mark.parametrize("shape", [(2, 5, 9, 11, 3, 8, 8), (1, 3, 17, 19, 2, 8, 8), (1, 2, 1, 37, 3, 4, 8),
                                   (1, 4, 8, 8, 1, 8, 8)],
                         ids=["nc13", "nc41", "row1_nc10", "nc8"])
def test_carry_and_reduction_transcribed(shape):
    """nc past one batch of kCarryBatch with a partial batch (13, 41), an exact batch (8), H = 1."""
    Bt, Dm, H, W, N, T, G = shape
    nc, errs = _transcribed_scan(Bt, Dm, H, W, N, T, G, seed=0)
    assert nc == (H * W + T - 1) // T
    assert max(errs.values()) < 1e-12, errs


def test_reduce_scatter_and_slots():
    """Lane l gets row l's sum; one thread's hS slots: the state entering sub-tile j at slot
    max(j - 1, 0) (slot 0 refilled before sub-tile 0), dA in slot kBwdSub - 2, set by the first
    processed sub-tile (the walk's last): every read sees the right state, dA is the full sum."""
    import random
    rnd = random.Random(0)
    v = [[rnd.uniform(-1, 1) for _ in range(32)] for _ in range(32)]
    got = _reduce_scatter32(v)
    for row in range(32):
        assert abs(got[row] - math.fsum(v[lane][row] for lane in range(32))) < 1e-12
    for sub in (3, 4, 8):  # kBwdSub
        for nsub in range(1, sub + 1):
            N = 3
            states = [[rnd.uniform(-1, 1) for _ in range(N)] for _ in range(nsub)]
            dAs = [[rnd.uniform(-1, 1) for _ in range(N)] for _ in range(nsub)]
            mem = [[math.nan] * N for _ in range(sub - 1)]
            mem[sub - 2] = [123.0] * N  # the previous walk's dA, already flushed
            for j in range(1, nsub):  # replay: sub-tiles 1.. at slot j - 1
                mem[j - 1] = list(states[j])
            for j in range(nsub - 1, -1, -1):
                if j == 0:
                    mem[0] = list(states[0])  # the saved chunk state
                for n in range(N):
                    assert mem[j - 1 if j > 0 else 0][n] == states[j][n], (sub, nsub, j, n)
                    mem[sub - 2][n] = (0.0 if j == nsub - 1 else mem[sub - 2][n]) + dAs[j][n]
            for n in range(N):
                assert abs(mem[sub - 2][n] - sum(dAs[j][n] for j in range(nsub))) < 1e-12


# ---- backward main pass, ported line by line (ss2d_bwd_main_kernel, bwd_subtile) ----
# Full rank with softplus, bias and D, in float64: the flat shared memory at BwdSmem's offsets
# (NaN until written, so a read of an unwritten or clobbered slot shows), the block's threads run
# phase by phase between its barriers and in lockstep per state (the shuffle), the batched du
# read-add-writes; the forward's entering states and the backward carries computed directly.

_TB, _KCH = 16, 64  # ss2d.h: kBwdTile, kChunk
_KS = _KCH // _TB
_LOG2E = 1.4426950408889634


def _nmax(N):
    return 4 if N <= 4 else 8 if N <= 8 else 16 if N <= 16 else 32 if N <= 32 else 64


def _ns_(nm):
    return nm + 4


def _threads(Dm):
    best, wb = 32, 1 << 30
    for w in range(1, 5):
        nth = 32 * w
        waste = (Dm + nth - 1) // nth * nth - Dm
        if waste <= wb:
            best, wb = nth, waste
    return best


def _bwd_smem(N, R, nth, main=True):
    ns = _ns_(_nmax(N))
    tile = nth * (_TB + 1)
    bc = 2 * _TB * max(ns, N)
    states = _KS * N * nth
    carry = states + (nth // 32) * N * 32 + R * nth if main else 0
    return 4 * (bc + R * _TB + 3 * tile + carry)


def _bwd_delta_smem(nth):  # ss2d.h: ss2d_bwd_delta_smem
    return 4 * (_KS - 1) * nth * (_TB + 1)


def _port_inputs(Bt, Dm, H, W, N, seed):
    """The ported passes' float64 inputs u, delta, bias, A, B, C, D, drawn in this order from one
    generator (returned first: a test's further draws follow them), and softplus(delta + bias)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    u = torch.randn(Bt, Dm, H, W, generator=g, dtype=f64)
    delta = torch.randn(Bt, 4, Dm, H, W, generator=g, dtype=f64) * 0.5
    bias = torch.rand(4, Dm, generator=g, dtype=f64) * -3
    A = -torch.rand(4, Dm, N, generator=g, dtype=f64) * 2 - 0.1
    B = torch.randn(Bt, 4, N, H, W, generator=g, dtype=f64)
    C = torch.randn(Bt, 4, N, H, W, generator=g, dtype=f64)
    D = torch.randn(4, Dm, generator=g, dtype=f64)
    dl_full = torch.nn.functional.softplus(delta + bias[None, :, :, None, None])
    return g, u, delta, bias, A, B, C, D, dl_full


def _port_main(Bt, Dm, H, W, N, seed=0, keep=False):
    """keep: the main pass's delta cache (p.keep_delta, NMAX 4 only)."""
    import numpy as np
    import torch
    from vmambax_kernels.selective_scan import reference
    f64 = torch.float64
    L = H * W
    nc = (L + _KCH - 1) // _KCH
    g, u, delta, bias, A, B, C, D, dl_full = _port_inputs(Bt, Dm, H, W, N, seed)
    dy = torch.randn(Bt, Dm, H, W, generator=g, dtype=f64)
    def plane(x, side):
        return (x if side == 0 else x.transpose(-1, -2)).reshape(*x.shape[:-2], L).numpy()

    def orig_pos(tt, side):
        if side:
            w = tt // H
            return (tt - w * H) * W + w
        return tt
    # forward entering states cE and backward carries cQ, [(b*4+k)*nc + c][n][d] (straightforward)
    cE = np.zeros((Bt, 4, nc, N, Dm))
    cQ = np.zeros((Bt, 4, nc, N, Dm))
    for b in range(Bt):
        for k in range(4):
            s, kk = k & 1, k >> 1
            dl, us, Bs, Cs, gs = plane(dl_full[b, k], s), plane(u[b], s), plane(B[b, k], s), plane(C[b, k], s), plane(dy[b], s)
            order = list(range(L)) if kk == 0 else list(range(L - 1, -1, -1))
            h = np.zeros((Dm, N))
            hs_in = {}
            for t in order:
                hs_in[t] = h.copy()
                h = np.exp(dl[:, t:t + 1] * A[k].numpy()) * h + (dl[:, t] * us[:, t])[:, None] * Bs[None, :, t]
            for c in range(nc):
                first_t = c * _KCH if kk == 0 else min(c * _KCH + _KCH, L) - 1
                cE[b, k, c] = hs_in[first_t].T
            # reverse: X entering chunk c's last step (walk order) = a_{t+1} dh_{t+1}
            e = np.zeros((Dm, N))
            xs = {}
            for t in reversed(order):
                xs[t] = e.copy()
                e = np.exp(dl[:, t:t + 1] * A[k].numpy()) * (Cs[None, :, t] * gs[:, t:t + 1] + e)
            for c in range(nc):
                last_t = min(c * _KCH + _KCH, L) - 1 if kk == 0 else c * _KCH
                cQ[b, k, c] = xs[last_t].T
    cE = cE.reshape(-1)
    cQ = cQ.reshape(-1)
    du_out = np.full((Bt, Dm, L), np.nan)  # row walks, (H, W) planes
    duT_out = np.full((Bt, Dm, L), np.nan)  # column walks, (W, H) planes
    ddl = np.zeros((Bt, 4, Dm, L))
    dBo = np.zeros((Bt, 4, N, L))
    dCo = np.zeros((Bt, 4, N, L))
    dA = np.zeros((4, Dm, N))
    dDo = np.zeros((4, Dm))
    dbo = np.zeros((4, Dm))
    nth = _threads(Dm)
    NM = _nmax(N)
    NS = _ns_(NM)
    R = 0
    tile = nth * (_TB + 1)
    sB = 0
    sC = sB + _TB * NS
    sDt = sC + _TB * NS
    t0 = sDt + R * _TB
    t1 = t0 + tile
    tU = t1 + tile
    hS = tU + tile
    sE = hS + (_KS - 1) * N * nth
    sDA = hS + (_KS - 2) * N * nth
    sP = sE + N * nth
    sDW = sP + (nth // 32) * N * 32
    sDl = sDW + R * nth
    assert not keep or NM == 4
    end = sDl + (_KS - 1) * tile * keep
    assert end * 4 == _bwd_smem(N, R, nth) + keep * _bwd_delta_smem(nth), (end * 4, _bwd_smem(N, R, nth))
    Anp, Dnp, bnp = A.numpy(), D.numpy(), bias.numpy()
    for side in range(2):
        for b in range(Bt):
            for c_ in range(nc):
                for d0 in range(0, Dm, nth):
                    sm = np.full(end, np.nan)
                    q0, q1 = c_ * _KCH, min(c_ * _KCH + _KCH, L)
                    nsub = (q1 - q0 + _TB - 1) // _TB
                    us, dys = plane(u[b], side), plane(dy[b], side)
                    for kk in range(2):
                        k = side + 2 * kk
                        row = (b * 4 + k) * nc + c_
                        dls_raw = plane(delta[b, k], side)
                        Bs, Cs = plane(B[b, k], side), plane(C[b, k], side)
                        def stage(q, cnt, nmajor, withC, withG):
                            rows = N if nmajor else NM
                            for e in range(rows * _TB):
                                n, i = e // _TB, e % _TB
                                on = n < N and i < cnt
                                o = e if nmajor else i * NS + n
                                sm[sB + o] = Bs[n, q + i] if on else 0.0
                                if withC:
                                    sm[sC + o] = Cs[n, q + i] if on else 0.0
                            for e in range(nth * _TB):
                                cc, i = e // _TB, e % _TB
                                d = d0 + cc
                                o = cc * (_TB + 1) + i
                                on = d < Dm and i < cnt
                                sm[tU + o] = us[d, q + i] if on else 0.0
                                z = dls_raw[d, q + i] if on else 0.0
                                if on:
                                    z += bnp[k, d]
                                sm[t0 + o] = z
                                if withG:
                                    sm[t1 + o] = dys[d, q + i] if on else 0.0
                        def bwd_delta(cc, cnt, r0):  # z from t0's row, delta into row r0
                            d = d0 + cc
                            if d >= Dm:
                                for i in range(_TB):
                                    sm[r0 + i] = 0.0
                                return
                            for i in range(_TB):
                                z = sm[t0 + cc * (_TB + 1) + i]
                                sm[r0 + i] = (z if z > 20 else math.log1p(math.exp(z))) if i < cnt else 0.0
                        def dl_row(cc, j, cached):  # the delta cache's row for sub-tile j, or t0's
                            return sDl + (j * nth + cc) * (_TB + 1) if cached else t0 + cc * (_TB + 1)
                        carried = lambda d: nc > 1 and d < Dm
                        for cc in range(nth):
                            d = d0 + cc
                            for n in range(N):
                                sm[sE + n * nth + cc] = cQ[(row * N + n) * Dm + d] if carried(d) else 0.0
                        dDacc = np.zeros(nth)
                        dbacc = np.zeros(nth)
                        # replay
                        A2 = np.zeros((nth, NM))
                        h = np.zeros((nth, NM))
                        for cc in range(nth):
                            d = d0 + cc
                            kd = k * Dm + (d if d < Dm else 0)
                            for n in range(NM):
                                A2[cc, n] = Anp.reshape(-1)[kd * N + n] * _LOG2E if n < N else 0.0
                                h[cc, n] = cE[(row * N + n) * Dm + d] if (carried(d) and n < N) else 0.0
                        for j in range(nsub):
                            if j > 0:
                                for cc in range(nth):
                                    for n in range(N):
                                        sm[hS + ((j - 1) * N + n) * nth + cc] = h[cc, n]
                            if j == nsub - 1:
                                break
                            st = nsub - 1 - j if kk else j
                            q = q0 + st * _TB
                            cnt = min(_TB, q1 - q)
                            stage(q, cnt, False, False, False)
                            for cc in range(nth):
                                bwd_delta(cc, cnt, dl_row(cc, j, keep))
                            for cc in range(nth):
                                for s in range(_TB):
                                    i = _TB - 1 - s if kk else s
                                    dl = sm[dl_row(cc, j, keep) + i]
                                    du = dl * sm[tU + cc * (_TB + 1) + i]
                                    for n in range(NM):
                                        h[cc, n] = 2.0 ** (dl * A2[cc, n]) * h[cc, n] + du * sm[sB + i * NS + n]
                        for j in range(nsub - 1, -1, -1):
                            st = nsub - 1 - j if kk else j
                            q = q0 + st * _TB
                            cnt = min(_TB, q1 - q)
                            stage(q, cnt, True, True, True)
                            cached = keep and j < nsub - 1
                            if not cached:
                                for cc in range(nth):
                                    bwd_delta(cc, cnt, t0 + cc * (_TB + 1))
                            if j == 0:
                                for cc in range(nth):
                                    d = d0 + cc
                                    for n in range(N):
                                        sm[hS + n * nth + cc] = cE[(row * N + n) * Dm + d] if carried(d) else 0.0
                            first = j == nsub - 1
                            # bwd_subtile, all threads in lockstep per state
                            slot = j - 1 if j > 0 else 0
                            dl = np.array([[sm[dl_row(cc, j, cached) + i] for i in range(_TB)] for cc in range(nth)])
                            uu = np.array([[sm[tU + cc * (_TB + 1) + i] for i in range(_TB)] for cc in range(nth)])
                            du = dl * uu
                            gg = np.array([[sm[t1 + cc * (_TB + 1) + i] for i in range(_TB)] for cc in range(nth)])
                            X = np.zeros((nth, _TB))
                            Y = np.zeros((nth, _TB))
                            for n in range(N):
                                vals = np.zeros((nth, 32))
                                for cc in range(nth):
                                    d = d0 + cc
                                    kd = k * Dm + (d if d < Dm else 0)
                                    An = Anp.reshape(-1)[kd * N + n]
                                    A2n = An * _LOG2E
                                    hh = sm[hS + (slot * N + n) * nth + cc]
                                    h0 = hh
                                    hA = np.zeros(_TB)
                                    aA = np.zeros(_TB)
                                    for s in range(_TB):
                                        i = _TB - 1 - s if kk else s
                                        aA[i] = 2.0 ** (dl[cc, i] * A2n)
                                        hh = aA[i] * hh + du[cc, i] * sm[sB + n * _TB + i]
                                        hA[i] = hh
                                    en = sm[sE + n * nth + cc]
                                    dAn = 0.0
                                    for s in range(_TB - 1, -1, -1):
                                        i = _TB - 1 - s if kk else s
                                        bi = sm[sB + n * _TB + i]
                                        dh = sm[sC + n * _TB + i] * gg[cc, i] + en
                                        X[cc, i] += dh * bi
                                        t = dh * (aA[i] * (h0 if s == 0 else hA[_TB - s if kk else s - 1]))
                                        Y[cc, i] += t * An
                                        dAn += t * dl[cc, i]
                                        en = aA[i] * dh
                                        hA[i] = gg[cc, i] * hA[i]
                                        aA[i] = dh * du[cc, i]
                                    sm[sE + n * nth + cc] = en
                                    sm[sDA + n * nth + cc] = (0.0 if first else sm[sDA + n * nth + cc]) + dAn
                                    vals[cc, :_TB] = hA
                                    vals[cc, _TB:] = aA
                                for w in range(nth // 32):
                                    res = _reduce_scatter32(vals[32 * w:32 * w + 32].tolist())
                                    for l in range(32):
                                        sm[sP + (w * N + n) * 32 + l] = res[l]
                            # barrier; dB / dC
                            nw = nth // 32
                            for o in range(N * 32):
                                n, r = o >> 5, o & 31
                                i = r & (_TB - 1)
                                if i >= cnt:
                                    continue
                                v = sum(sm[sP + (ww * N + n) * 32 + r] for ww in range(nw))
                                (dCo if r < _TB else dBo)[b, k, n, orig_pos(q + i, side)] += v
                            for cc in range(nth):
                                d = d0 + cc
                                for i in range(_TB):
                                    on = i < cnt and d < Dm
                                    sp = -math.expm1(-dl[cc, i])
                                    dz = (uu[cc, i] * X[cc, i] + Y[cc, i]) * sp if on else 0.0
                                    Dk = Dnp[k, d] if d < Dm else 0.0
                                    sm[t0 + cc * (_TB + 1) + i] = dl[cc, i] * X[cc, i] + Dk * gg[cc, i]
                                    sm[t1 + cc * (_TB + 1) + i] = dz
                                    dDacc[cc] += gg[cc, i] * uu[cc, i]
                                    dbacc[cc] += dz
                            # barrier; du read-add-write in batches, ddl
                            wfirst = kk == 0
                            dst = duT_out if side else du_out  # the side's own layout
                            # each thread: a fixed position i (tile_lane), channels stepping by nth / TB
                            cstep, nact = nth // _TB, min(nth, Dm - d0)
                            for tid in range(nth):
                                i = tid % _TB
                                for c0 in range(tid // _TB, nact if i < cnt else 0, 8 * cstep):
                                    prev = []
                                    for uix in range(8):
                                        cc = c0 + uix * cstep
                                        on = cc < nact and not wfirst
                                        prev.append(dst[b, d0 + cc, q + i] if on else 0.0)
                                    for uix in range(8):
                                        cc = c0 + uix * cstep
                                        if cc >= nact:
                                            continue
                                        vv = sm[t0 + cc * (_TB + 1) + i]
                                        dst[b, d0 + cc, q + i] = vv if wfirst else prev[uix] + vv
                                        ddl[b, k, d0 + cc, orig_pos(q + i, side)] = sm[t1 + cc * (_TB + 1) + i]
                        for cc in range(nth):
                            d = d0 + cc
                            if d < Dm:
                                for n in range(N):
                                    dA[k, d, n] += sm[sDA + n * nth + cc]
                                dDo[k, d] += dDacc[cc]
                                dbo[k, d] += dbacc[cc]
    # launch 4, the forward's merge pass in fp32 in place: du += duT^T (ported below)
    du_flat, writes = du_out.reshape(-1), np.zeros(du_out.size, dtype=np.int64)
    (_merge_flat if _merge_is_flat(H, W) else _merge_tiled)(du_flat, duT_out.reshape(-1), du_flat, Bt, Dm, H, W,
                                                            1 << 30, writes)
    assert (writes == 1).all()
    leaves = [t.clone().requires_grad_(True) for t in (u, delta, A, B, C, D, bias)]
    y = reference.selective_scan_2d(*leaves, True, f64)
    y.backward(dy)
    out = {}
    for name, mine, lf in (("du", du_out, leaves[0]), ("ddelta", ddl, leaves[1]), ("dA", dA, leaves[2]),
                           ("dB", dBo, leaves[3]), ("dC", dCo, leaves[4]), ("dD", dDo, leaves[5]), ("dbias", dbo, leaves[6])):
        ref = lf.grad.numpy().reshape(mine.shape)
        out[name] = float(np.abs(mine - ref).max() / np.abs(ref).max())
    return nc, nth, out


@pytest.mark.parametrize("shape", [(1, 5, 9, 11, 3), (1, 3, 5, 13, 2), (1, 34, 4, 5, 2), (1, 2, 1, 130, 2)],
                         ids=["nsub4+3", "nsub4+1", "nc1_2warps", "nc3_H1"])
@pytest.mark.parametrize("keep", [False, True], ids=["", "delta_cache"])
def test_backward_main_pass_ported(shape, keep):
    """Sub-tile counts 4 and 3, 2, 1 (the dA slot shared with sub-tile 3's state; slot 0 refilled),
    idle threads of a 2-warp block, H = 1, with and without the delta cache; the column side's du in
    its own layout, then the merge: du, ddelta, dA, dB, dC, dD, dbias within 1e-12 relative."""
    nc, nth, errs = _port_main(*shape, keep=keep)
    assert max(errs.values()) < 1e-12, errs


# ---- forward output pass and merge pass, ported line by line (ss2d_fwd_out_kernel, ---------------
# ---- ss2d_fwd_merge_tiled_kernel, ss2d_fwd_merge_flat_kernel) in float64 ----------------------------
# The row walks' pair sum goes to acc in (H, W) planes, the column walks' to accT in (W, H) planes,
# each at its side's own positions; the merge writes out = acc + accT^T. Buffers start as NaN, so an
# element read before it is written, or never written, shows; every write to out is counted.

_KT, _RMW_FWD = 16, 4                         # ss2d.h: kTile, kRmwBatchFwd
_MT, _MR, _MF, _FB = 32, 8, 1024, 4           # kMergeTile, kMergeRows, kMergeFlat; kFlatBatch (.cuh)


def test_fwd_merge_constants_match_the_sources():
    h = (ROOT / "csrc" / "selective_scan" / "ss2d.h").read_text()
    cuh = (ROOT / "csrc" / "selective_scan" / "ss2d_fwd_kernel.cuh").read_text()
    assert re.search(r"kMergeTile = (\d+), kMergeRows = (\d+), kMergeFlat = (\d+);", h).groups() == \
        (str(_MT), str(_MR), str(_MF))
    assert re.search(r"constexpr int kTile = (\d+);", h).group(1) == str(_KT)
    assert re.search(r"kRmwBatchFwd = (\d+)", h).group(1) == str(_RMW_FWD)
    assert re.search(r"constexpr int kFlatBatch = (\d+), kFlatThreads = kMergeFlat / kFlatBatch;", cuh).group(1) \
        == str(_FB)
    assert re.search(r"constexpr int kChunk = (\d+);", h).group(1) == str(_KCH)


def _merge_is_flat(H, W):  # ss2d.h: ss2d_merge_flat
    m = min(H, W)
    return m == 1 or (m < _MT and H * W <= _MF)


def _merge_tiled(acc, accT, out, Bt, Dm, H, W, grid, writes):
    """ss2d_fwd_merge_tiled_kernel: blocks of _MT x _MR threads, grid-stride over tiles."""
    import numpy as np
    L, RPT = H * W, _MT // _MR
    tiles_w, tiles_h = -(-W // _MT), -(-H // _MT)
    per_plane = tiles_w * tiles_h
    total = Bt * Dm * per_plane
    for bx in range(min(grid, total)):
        for blk in range(bx, total, grid):
            plane = blk // per_plane
            t = blk - plane * per_plane
            th = t // tiles_w
            h0, w0 = th * _MT, (t - th * tiles_w) * _MT
            a, at = plane * L, plane * L
            s = np.full((_MT, _MT + 1), np.nan)
            r = np.zeros((_MR, _MT, RPT))
            for ty in range(_MR):  # phase 1: acc into registers, accT into s
                for tx in range(_MT):
                    for j in range(RPT):
                        h, w = h0 + ty + j * _MR, w0 + tx
                        r[ty, tx, j] = acc[a + h * W + w] if (h < H and w < W) else 0.0
                    for j in range(RPT):
                        w, h = w0 + ty + j * _MR, h0 + tx
                        if w < W and h < H:
                            s[ty + j * _MR][tx] = accT[at + w * H + h]
            for ty in range(_MR):  # barrier; phase 2
                for tx in range(_MT):
                    for j in range(RPT):
                        h, w = h0 + ty + j * _MR, w0 + tx
                        if h < H and w < W:
                            v = r[ty, tx, j] + s[tx][ty + j * _MR]
                            assert not math.isnan(v), (blk, h, w)
                            out[plane * L + h * W + w] = v
                            writes[plane * L + h * W + w] += 1


def _merge_flat(acc, accT, out, Bt, Dm, H, W, grid, writes):
    """ss2d_fwd_merge_flat_kernel: blocks of _MF // _FB threads over ppb whole planes."""
    L, planes, nthr = H * W, Bt * Dm, _MF // _FB
    ppb = 1 if L >= _MF else _MF // L
    assert ppb * L <= _MF or ppb == 1  # one pass of the block's threads, or one plane
    nblk = -(-planes // ppb)
    for bx in range(min(grid, nblk)):
        for blk in range(bx, nblk, grid):
            p0 = blk * ppb
            base, n = p0 * L, min(ppb, planes - p0) * L
            for tid in range(nthr):
                for e0 in range(tid, n, _FB * nthr):
                    r = [None] * _FB
                    for j in range(_FB):
                        e = e0 + j * nthr
                        if e < n:
                            pl = e // L
                            pos = e - pl * L
                            h = pos // W
                            w = pos - h * W
                            r[j] = acc[base + e] + accT[base + pl * L + w * H + h]
                    for j in range(_FB):
                        e = e0 + j * nthr
                        if e < n:
                            assert not math.isnan(r[j]), (blk, e)
                            out[base + e] = r[j]
                            writes[base + e] += 1


def _port_fwd_out(Bt, Dm, H, W, N, out_is_acc, seed=0):
    """Output pass of both sides as one launch (blockIdx.x = (b * 2 + side) * nc + chunk), then
    acc / accT for the merge; returns (acc, accT, reference y) as flat float64 arrays."""
    import numpy as np
    import torch
    from vmambax_kernels.selective_scan import reference
    L = H * W
    nc = (L + _KCH - 1) // _KCH
    _, u, delta, bias, A, B, C, D, dl_full = _port_inputs(Bt, Dm, H, W, N, seed)
    ref = reference.selective_scan_2d(u, delta, A, B, C, D, bias, True, torch.float64).numpy().reshape(-1)

    def plane(x, side):
        return (x if side == 0 else x.transpose(-1, -2)).reshape(*x.shape[:-2], L).numpy()

    Anp, Dnp = A.numpy(), D.numpy()
    cE = np.zeros((Bt, 4, nc, Dm, N))  # the state entering each chunk of each walk
    for b in range(Bt):
        for k in range(4):
            s, kk = k & 1, k >> 1
            dl, us, Bs = plane(dl_full[b, k], s), plane(u[b], s), plane(B[b, k], s)
            h = np.zeros((Dm, N))
            for t in (range(L) if kk == 0 else range(L - 1, -1, -1)):
                if (t % _KCH == 0) if kk == 0 else ((t + 1) % _KCH == 0 or t == L - 1):
                    cE[b, k, t // _KCH] = h
                h = np.exp(dl[:, t:t + 1] * Anp[k]) * h + (dl[:, t] * us[:, t])[:, None] * Bs[None, :, t]
    acc = np.full(Bt * Dm * L, np.nan)
    accT = np.full(Bt * Dm * L, np.nan)
    nth = _threads(Dm)
    for bx in range(nc * 2 * Bt):
        for by in range(-(-Dm // nth)):
            c_ = bx % nc  # ChunkBlock(p, true)
            rest = bx // nc
            b, side = rest // 2, rest % 2
            d0, q0 = by * nth, c_ * _KCH
            q1 = min(q0 + _KCH, L)
            ntile = (q1 - q0 + _KT - 1) // _KT
            dst = accT if side else acc
            us = plane(u[b], side)
            for kk in range(2):
                k = side + 2 * kk
                dl, Bs, Cs = plane(dl_full[b, k], side), plane(B[b, k], side), plane(C[b, k], side)
                act = [d0 + cc < Dm for cc in range(nth)]
                h = np.array([cE[b, k, c_, d0 + cc] if act[cc] else np.zeros(N) for cc in range(nth)])
                for jt in range(ntile):
                    tt = ntile - 1 - jt if kk else jt
                    q = q0 + tt * _KT
                    cnt = min(_KT, q1 - q)
                    sU = np.full((nth, _KT + 1), np.nan)
                    for cc in range(nth):
                        for i in range(_KT):
                            sU[cc, i] = us[d0 + cc, q + i] if (act[cc] and i < cnt) else 0.0
                    for s_ in range(cnt):
                        i = cnt - 1 - s_ if kk else s_
                        for cc in range(nth):
                            if not act[cc]:
                                continue
                            d = d0 + cc
                            uu, dd = sU[cc, i], dl[d, q + i]
                            h[cc] = np.exp(dd * Anp[k, d]) * h[cc] + dd * uu * Bs[:, q + i]
                            sU[cc, i] = Dnp[k, d] * uu + float((Cs[:, q + i] * h[cc]).sum())
                    # the store phase, per thread
                    first = kk == 0
                    cstep, nact = nth // _KT, min(nth, Dm - d0)
                    for tid in range(nth):
                        i = tid & (_KT - 1)  # tile_lane
                        if i >= cnt:
                            continue
                        step = cstep * L
                        o = (b * Dm + d0 + tid // _KT) * L + q + i
                        for c0 in range(tid // _KT, nact, _RMW_FWD * cstep):
                            prev = [dst[o + x * step] if (c0 + x * cstep < nact and not first) else 0.0
                                    for x in range(_RMW_FWD)]
                            for x in range(_RMW_FWD):
                                if c0 + x * cstep >= nact:
                                    break
                                assert not math.isnan(prev[x]), (b, side, kk, c0)
                                y = sU[c0 + x * cstep, i]
                                dst[o + x * step] = y if first else prev[x] + y
                            o += _RMW_FWD * step
    assert not (np.isnan(acc).any() or np.isnan(accT).any())
    return acc, accT, ref, nc, nth


@pytest.mark.parametrize("shape", [(2, 5, 37, 45, 3), (1, 3, 8, 150, 2), (1, 2, 33, 64, 1), (3, 40, 5, 7, 2),
                                   (2, 3, 1, 37, 2), (2, 3, 40, 1, 2), (1, 2, 1, 1, 2), (1, 34, 4, 4, 2),
                                   (1, 2, 20, 30, 1)],
                         ids=["tiled_37x45", "tiled_8x150", "tiled_33x64", "flat_5x7_ppb29",
                              "flat_H1", "flat_W1", "flat_L1", "flat_4x4_2warps", "flat_20x30"])
@pytest.mark.parametrize("out_is_acc", [False, True], ids=["out16", "out32_inplace"])
def test_fwd_out_and_merge_ported(shape, out_is_acc):
    """Output pass (both sides, chunks ending mid-row / mid-column, partial tiles, channels not a
    multiple of the block) and both merge kernels on every shape (the one the launcher picks and the
    other), with a full grid and a 3-block grid (the grid-stride loops), fp32 out in place (out is acc):
    out within 1e-12 of the reference scan, every element written exactly once."""
    import numpy as np
    Bt, Dm, H, W, N = shape
    acc, accT, ref, nc, nth = _port_fwd_out(Bt, Dm, H, W, N, out_is_acc)
    assert nc == (H * W + _KCH - 1) // _KCH
    picked = _merge_is_flat(H, W)
    for merge in (_merge_flat, _merge_tiled):
        for grid in (1 << 30, 3):
            a = acc.copy()
            out = a if out_is_acc else np.full_like(a, np.nan)
            writes = np.zeros(a.shape, dtype=np.int64)
            merge(a, accT, out, Bt, Dm, H, W, grid, writes)
            assert (writes == 1).all(), (merge.__name__, grid, int(writes.min()), int(writes.max()))
            err = float(np.abs(out - ref).max() / np.abs(ref).max())
            assert err < 1e-12, (merge.__name__, picked, grid, err)


def test_merge_tile_is_bank_conflict_free_and_rule():
    """s[w][h] with row stride _MT + 1: a warp (fixed ty, tx = 0..31) writes s[ty + j * _MR][tx]
    and reads s[tx][ty + j * _MR]; both hit 32 distinct banks. The launcher's choice of kernel."""
    for ty in range(_MR):
        for j in range(_MT // _MR):
            assert len({((ty + j * _MR) * (_MT + 1) + tx) % 32 for tx in range(32)}) == 32
            assert len({(tx * (_MT + 1) + ty + j * _MR) % 32 for tx in range(32)}) == 32
    assert _merge_is_flat(4, 4) and _merge_is_flat(16, 16) and _merge_is_flat(1, 4096) and _merge_is_flat(4096, 1)
    assert not _merge_is_flat(32, 32) and not _merge_is_flat(128, 96) and not _merge_is_flat(8, 150)
    assert not _merge_is_flat(37, 53)


def _fma32(a, b, c):
    """float32 fma as the tests model it: the product exact in float64, the sum rounded to float32."""
    import numpy as np
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def test_softplus_transcribed():
    """ss2d_common.cuh's branch-free softplus, transcribed in float32 with its constants read from
    the source and the two MUFU results (ex2, rcp.approx) correctly rounded: within 5 ulp of
    log1p(exp(z)) in float64 (4.2 when designed; without the split of |z| log2(e) into kLog2e and
    kLog2eLo, 29 at z = -30), and z itself above torch's threshold of 20."""
    import numpy as np
    src = (ROOT / "csrc" / "selective_scan" / "ss2d_common.cuh").read_text()
    body = src[src.index("float softplus(float z)"):]
    body = body[:body.index("\n}\n")]
    f32 = np.float32
    log2e = f32(float(re.search(r"kLog2e = ([0-9.e+-]+)f;", src).group(1)))
    log2e_lo = f32(float(re.search(r"kLog2eLo = ([0-9.e+-]+)f;", body).group(1)))
    ln2 = f32(float(re.search(r"kLn2 = ([0-9.e+-]+)f;", body).group(1)))
    dens = [int(d) for d in re.findall(r"2\.f / (\d+)\.f", body)]  # Horner order, highest term first
    assert dens == list(range(13, 2, -2)), dens
    assert log2e_lo == f32(1 / math.log(2) - float(log2e))  # the float32 nearest the remainder

    z = np.concatenate([np.linspace(-40, 40, 400_001), np.geomspace(1e-8, 40, 20_000), -np.geomspace(1e-8, 40, 20_000),
                        [0.0, 20.0, np.nextafter(f32(20), f32(21)), 87.0, -87.0, -100.0]]).astype(f32)
    a = -np.abs(z)
    xh = (a * log2e).astype(f32)
    xl = _fma32(a, log2e_lo, _fma32(a, log2e, -xh))
    t0 = np.exp2(xh.astype(np.float64)).astype(f32)
    t = _fma32((t0 * ln2).astype(f32), xl, t0)
    s = (t * (1.0 / (f32(2) + t).astype(np.float64)).astype(f32)).astype(f32)
    s2 = (s * s).astype(f32)
    q = f32(2 / dens[0])
    for d in dens[1:]:
        q = _fma32(q, s2, f32(2 / d))
    q = _fma32(q, s2, f32(2))
    got = _fma32(s, q, np.maximum(z, f32(0))).astype(np.float64)
    z64 = z.astype(np.float64)
    want = np.where(z64 > 20, z64, np.log1p(np.exp(z64)))
    ulp = np.abs(got - want) / np.spacing(np.abs(want).astype(f32)).astype(np.float64)
    assert ulp.max() <= 5, (ulp.max(), z[ulp.argmax()])
    assert np.array_equal(got[z > 20], z64[z > 20])


def test_sigmoid_from_softplus_transcribed():
    """ss2d_common.cuh's softplus' from delta = softplus(z) (1 - exp(-delta)), transcribed in float32 with
    its coefficients read from the source and ex2 correctly rounded: within 2 ulp of -expm1(-delta) in
    float64 over [0, 100] (1.64 when designed), 0 at delta = 0 and exactly 1 from delta = 20."""
    import numpy as np
    src = (ROOT / "csrc" / "selective_scan" / "ss2d_common.cuh").read_text()
    body = src[src.index("float sigmoid_from_softplus(float delta)"):]
    body = body[:body.index("\n}\n")]
    f32 = np.float32
    log2e = f32(float(re.search(r"kLog2e = ([0-9.e+-]+)f;", src).group(1)))
    coef = [f32(float(c)) for c in re.findall(r"([-0-9.e]+)f(?=[;)])", body)[:8]]  # Horner order
    assert len(coef) == 8 and coef[-1] == 1 and coef[-2] == -0.5, coef

    x = np.concatenate([np.linspace(0, 4, 400_001), np.geomspace(1e-10, 100, 50_000),
                        np.nextafter(f32(1), f32(0)) + np.arange(-50, 50, dtype=f32) * np.spacing(f32(1)),
                        [0.0, 1.0, 20.0, 87.0]]).astype(f32)
    q = np.full_like(x, coef[0])
    for c in coef[1:]:
        q = _fma32(q, x, c)
    e = np.exp2((-x * log2e).astype(f32).astype(np.float64)).astype(f32)
    got = np.where(x < 1, (x * q).astype(f32), (f32(1) - e).astype(f32)).astype(np.float64)
    want = -np.expm1(-x.astype(np.float64))
    ulp = np.abs(got - want)[x > 0] / np.spacing(want[x > 0].astype(f32)).astype(np.float64)
    assert ulp.max() <= 2, (ulp.max(), x[x > 0][ulp.argmax()])
    assert got[x == 0].max() == 0 and (got[x >= 20] == 1).all()
