"""CI on CPU: every .cu under csrc/ compiles with nvcc against torch's headers (no GPU needed).

The fast test stops at unoptimised PTX (nvcc's front end, template instantiation and code
generation; -Xcicc -O0, no ptxas: ~5 s a file instead of ~60 s on 2 cores) so the whole set fits
the CPU budget; the slow one builds optimised sm_90 machine code and reports registers and spills.
torch's CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h: a one-line stand-in is generated.

Also here, since it needs no GPU either: a float64 transcription of the index logic that the v5 kernel
set (VMAMBAX_CUDA_SCAN=v5) adds, the batched carry passes, the warp reduce-scatter of dB / dC and the
main pass's shared slots, checked against the reference scan and its autograd.
"""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from csrc_build import NVCC_FLAGS  # noqa: E402

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


# ---- v5 index logic, transcribed in float64 (csrc/selective_scan: *_carry_v5_kernel, bwd_subtile<.., true>) ----

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


def _carry_v5(buf, sums, A, Bt, Dm, N, nc, G, forward):
    """One thread per (b, k, n, d), line by line as ss2d_{fwd,bwd}_carry_v5_kernel (buf: cE / cQ flat
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
    """Forward (chunk, v5 carry, output) and backward (chunk, v5 carry, main with the reduce-scatter)
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
    _carry_v5(cE, cS, A, Bt, Dm, N, nc, G, forward=True)
    _carry_v5(cQ, cSb, A, Bt, Dm, N, nc, G, forward=False)
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
def test_v5_carry_and_reduction_transcribed(shape):
    """nc past one batch of kCarryBatch with a partial batch (13, 41), an exact batch (8), H = 1."""
    Bt, Dm, H, W, N, T, G = shape
    nc, errs = _transcribed_scan(Bt, Dm, H, W, N, T, G, seed=0)
    assert nc == (H * W + T - 1) // T
    assert max(errs.values()) < 1e-12, errs


def test_v5_reduce_scatter_and_slots():
    """Lane l gets row l's sum; one thread's v5 slots: the state entering sub-tile j at slot
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
