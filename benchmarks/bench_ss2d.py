"""SS2D benchmark over DESIGN.md's shape set (contract: DESIGN.md, "Benchmark contract").

    python benchmarks/bench_ss2d.py [--cases enc1,rect1] [--dtypes bf16,fp16] [--scopes core,op]
                                    [--providers cuda,triton,unfused_mamba] [--quick] [--no-record]
    python benchmarks/bench_ss2d.py --sanitize     # cut-down fwd+bwd pass for compute-sanitizer
    python benchmarks/bench_ss2d.py --profile [--providers triton] [--cases dec3]   # one fwd+bwd for Nsight Compute

Scope "core": cross_selective_scan_2d + LayerNorm (x after the depthwise conv and SiLU -> output
after out_norm), projections included. Scope "op": selective_scan_2d alone, delta/B/C given.
fwd under no_grad; fwdbwd = forward + backward of every input and parameter with a fixed random
output gradient; peak_mb = extra memory of fwdbwd. Providers: cuda, triton (when available), the
unfused peer (PyTorch cross-scan + mamba-ssm selective_scan_fn + PyTorch cross-merge:
unfused_mamba; unfused_torch, the reference scan in that pipeline, where mamba-ssm is absent and
the case is small enough). Every record names the provider that actually ran.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402
import vmambax_kernels as vk  # noqa: E402
from vmambax_kernels.selective_scan import reference  # noqa: E402
from vmambax_kernels.testing import SHAPES, ScanCase, scan_inputs  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MUFU_EXP_PER_S = 4.2e12  # DESIGN.md: H100 SXM ex2, 16 / clock / SM
# DESIGN.md: the published path, core scope, batch 8, H100 (fwd ms, fwdbwd ms, extra MB) and the
# mamba-ssm 2.3.2 + torch cross-scan path (fwd ms, fwdbwd ms).
PUBLISHED = {"enc1": (7.55, 23.2, 2380), "enc2": (3.64, 10.7, 1150), "enc3": (1.76, 5.06, 568), "enc4": (1.28, 2.87, 288)}
PUBLISHED_MAMBA = {"enc1": (5.24, 18.3), "enc2": (2.43, 8.57), "enc3": (1.16, 3.90), "enc4": (0.84, 2.67)}
QUICK = ["enc1", "rect1", "dcim_inner1", "dec3"]


def exp_floor_ms(case: ScanCase, Bt: int) -> float:
    """One MUFU exp per (b, k, d, l, n): the forward's floor (DESIGN.md, "The limits")."""
    return Bt * 4 * case.Dm * case.H * case.W * case.N / MUFU_EXP_PER_S * 1e3


# ---- the unfused peer: PyTorch cross-scan, a 1D selective scan per direction, cross-merge ----

def _cross_scan(x):  # (Bt, C, H, W) -> (Bt, 4, C, L) in the four walk orders
    Bt, C, H, W = x.shape
    a = x.flatten(2)
    b = x.transpose(2, 3).flatten(2)
    return torch.stack([a, b, a.flip(-1), b.flip(-1)], dim=1)


def _cross_merge(ys, H, W):  # (Bt, 4, C, L) -> (Bt, C, H, W)
    Bt, _, C, L = ys.shape
    y = ys[:, 0] + ys[:, 2].flip(-1)
    yc = ys[:, 1] + ys[:, 3].flip(-1)
    return (y + yc.view(Bt, C, W, H).transpose(2, 3).reshape(Bt, C, L)).view(Bt, C, H, W)


def _scan_1d(provider):
    if provider == "unfused_mamba":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn

    def torch_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
        # (Bt, K*Dm, L) through the reference 2D scan on a 1 x L plane, one direction at a time.
        Bt, KD, L = u.shape
        K = B.shape[1]
        Dm = KD // K
        outs = []
        for k in range(K):
            sl = slice(k * Dm, (k + 1) * Dm)
            Ak = torch.stack([A[sl]] + [torch.zeros_like(A[sl])] * 3)
            d4 = torch.zeros(Bt, 4, Dm, 1, L, dtype=u.dtype, device=u.device)
            d4[:, 0] = delta[:, sl].unsqueeze(2)
            B4 = torch.zeros(Bt, 4, B.shape[2], 1, L, dtype=u.dtype, device=u.device)
            C4 = torch.zeros_like(B4)
            B4[:, 0], C4[:, 0] = B[:, k].unsqueeze(2), C[:, k].unsqueeze(2)
            bias = None if delta_bias is None else torch.stack([delta_bias[sl]] + [torch.full_like(delta_bias[sl], -1e4)] * 3)
            Dk = None if D is None else torch.stack([D[sl]] + [torch.zeros_like(D[sl])] * 3)
            outs.append(reference.selective_scan_2d(u[:, sl].unsqueeze(2), d4, Ak, B4, C4, Dk, bias,
                                                    delta_softplus).squeeze(2))
        return torch.cat(outs, 1)
    return torch_scan


def unfused_op(provider):
    scan = _scan_1d(provider)

    def fn(u, delta, A, B, C, D, delta_bias):
        Bt, Dm, H, W = u.shape
        L = H * W
        xs = _cross_scan(u).reshape(Bt, 4 * Dm, L)
        dts = _cross_scan(delta.flatten(1, 2).view(Bt, 4 * Dm, H, W)).view(Bt, 4, 4, Dm, L)
        dts = torch.stack([dts[:, k, k] for k in range(4)], 1).reshape(Bt, 4 * Dm, L)
        Bs = torch.stack([_cross_scan(B[:, k])[:, k] for k in range(4)], 1)  # (Bt, 4, N, L)
        Cs = torch.stack([_cross_scan(C[:, k])[:, k] for k in range(4)], 1)
        ys = scan(xs, dts, A.reshape(4 * Dm, -1), Bs, Cs, D.reshape(-1), delta_bias=delta_bias.reshape(-1),
                  delta_softplus=True)
        return _cross_merge(ys.view(Bt, 4, Dm, L).float(), H, W)
    return fn


def unfused_core(provider):
    scan = _scan_1d(provider)

    def fn(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
        Bt, Dm, H, W = x.shape
        L = H * W
        N, R = A_logs.shape[1], dt_projs_weight.shape[2]
        xs = _cross_scan(x)                                                       # (Bt, 4, Dm, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight.to(x.dtype))
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight.to(x.dtype))
        ys = scan(xs.reshape(Bt, -1, L), dts.reshape(Bt, -1, L), -torch.exp(A_logs.float()), Bs.contiguous(),
                  Cs.contiguous(), Ds.float(), delta_bias=dt_projs_bias.float().reshape(-1), delta_softplus=True)
        return _cross_merge(ys.view(Bt, 4, Dm, L).float(), H, W)
    return fn


# ---- inputs and providers ----

def core_inputs(case: ScanCase, dtype, Bt: int, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    Dm, N, R = case.Dm, case.N, case.R
    dt_init = torch.exp(torch.rand(4, Dm, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(x=torch.randn(Bt, Dm, case.H, case.W, generator=g).to(dtype).cuda(),
                x_proj_weight=(torch.randn(4, R + 2 * N, Dm, generator=g) * Dm ** -0.5).cuda(),
                dt_projs_weight=((torch.rand(4, Dm, R, generator=g) * 2 - 1) * R ** -0.5).cuda(),
                dt_projs_bias=(dt_init + torch.log(-torch.expm1(-dt_init))).cuda(),
                A_logs=torch.log(torch.arange(1, N + 1.0)).repeat(4 * Dm, 1).cuda(),
                Ds=torch.ones(4 * Dm).cuda())


FORWARD_ONLY = ()  # providers timed without a backward


def make_fn(scope: str, provider: str):
    if scope == "core":
        if provider in ("cuda", "triton", "reference"):
            scan = lambda **kw: vk.cross_selective_scan_2d(**kw, backend=provider)  # noqa: E731
        else:
            scan = lambda **kw: unfused_core(provider)(**kw)  # noqa: E731

        def fn(**kw):
            y = scan(**kw)                                                  # (Bt, Dm, H, W) fp32
            return F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],))       # out_norm, channels-last
        return fn
    if provider in ("cuda", "triton", "reference"):
        return lambda **kw: vk.selective_scan_2d(**kw, backend=provider)  # noqa: E731
    op = unfused_op(provider)
    return lambda **kw: op(**kw)  # noqa: E731


def providers_here(requested):
    avail = vk.available_backends()
    out = []
    for p in requested:
        if p in ("cuda", "triton"):
            if avail[p].available:
                out.append(p)
            else:
                print(f"# {p}: not measured: {avail[p].reason}")
        elif p == "unfused":
            try:
                import mamba_ssm  # noqa: F401
                out.append("unfused_mamba")
            except ImportError as exc:
                print(f"# unfused_mamba: mamba-ssm not importable ({exc}); peer is unfused_torch (small cases only)")
                out.append("unfused_torch")
        else:
            out.append(p)
    return out


def measure(case: ScanCase, scope: str, provider: str, dtype, Bt: int, rep_ms: float) -> dict:
    inputs = core_inputs(case, dtype, Bt) if scope == "core" else scan_inputs(case, dtype, "cuda", seed=0, Bt=Bt)
    fn = make_fn(scope, provider)
    with torch.no_grad():
        fwd = harness.time_ms(lambda: fn(**inputs), rep_ms=rep_ms)
    if provider in FORWARD_ONLY:
        return dict(fwd_ms=fwd, fwdbwd_ms=None, peak_mb=None)
    leaves = {k: (v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    wanted = [v for v in leaves.values() if isinstance(v, torch.Tensor)]
    gy = torch.randn_like(fn(**leaves).detach())

    def fwdbwd():
        return torch.autograd.grad(fn(**leaves), wanted, gy)
    t_fb = harness.time_ms(fwdbwd, rep_ms=rep_ms)
    peak = harness.peak_mb(fwdbwd)
    return dict(fwd_ms=fwd, fwdbwd_ms=t_fb, peak_mb=peak)


def too_slow(case, provider, Bt):
    return provider == "unfused_torch" and Bt * case.Dm * case.H * case.W > 2e6


def run(args) -> list[dict]:
    env = harness.env_info()
    print(f"# card: {env['gpu']}  torch {env['torch']}  cuda {env['cuda']}  triton {env['triton']}  commit {env['commit']}")
    providers = providers_here(args.providers.split(","))
    records = []
    rep = 30 if args.quick else 100
    for name in args.cases.split(","):
        case = SHAPES[name]
        for dname in args.dtypes.split(","):
            for scope in args.scopes.split(","):
                for prov in providers:
                    if too_slow(case, prov, case.Bt):
                        print(f"# {name} {scope} {prov}: skipped (the reference scan is too slow at this size)")
                        continue
                    try:
                        figs = measure(case, scope, prov, DTYPES[dname], case.Bt, rep)
                    except Exception as exc:  # one failing provider must not hide the others' numbers
                        print(f"# {name} {scope} {prov} {dname}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                        torch.cuda.empty_cache()
                        continue
                    floor = exp_floor_ms(case, case.Bt)
                    records.append(harness.record("ss2d", name, prov, dname, case.Bt, env, scope=scope,
                                                  floor_ms=floor, **figs))
                    if not args.no_record:  # as we go: a run cut short keeps what it measured
                        harness.append_records(records[-1:])
                    fb = "       -" if figs["fwdbwd_ms"] is None else f"{figs['fwdbwd_ms']:8.3f}"
                    pk = "       -" if figs["peak_mb"] is None else f"{figs['peak_mb']:8.1f}"
                    print(f"  {name:12s} {scope:4s} {dname} {prov:14s} fwd {figs['fwd_ms']:8.3f} ms  "
                          f"fwdbwd {fb} ms  peak {pk} MB  floor {floor:.3f} ms")
                    torch.cuda.empty_cache()
    summarize(records, env["gpu"])
    return records


def summarize(records, gpu):
    peers = ("unfused_mamba", "unfused_torch")
    rows = []
    for r in records:
        if r["provider"] in peers:
            continue
        peer = next((p for p in records if p["provider"] in peers and p["case"] == r["case"]
                     and p["scope"] == r["scope"] and p["dtype"] == r["dtype"]), None)
        pub = PUBLISHED.get(r["case"]) if r["scope"] == "core" and r["batch"] == 8 else None
        rows.append(dict(case=r["case"], scope=r["scope"], dtype=r["dtype"], provider=r["provider"],
                         fwd=r["fwd_ms"], fwdbwd=r.get("fwdbwd_ms"), peak=r.get("peak_mb"),
                         peer=peer["provider"] if peer else "-",
                         vs_peer_fwd=harness.ratio(r["fwd_ms"], peer and peer["fwd_ms"]),
                         vs_peer_fb=harness.ratio(r.get("fwdbwd_ms"), peer and peer.get("fwdbwd_ms")),
                         vs_pub_fwd=harness.ratio(r["fwd_ms"], pub and pub[0]),
                         vs_pub_fb=harness.ratio(r.get("fwdbwd_ms"), pub and pub[1]),
                         pub_mem_ratio=harness.ratio(r.get("peak_mb"), pub and float(pub[2])),
                         fwd_over_floor=f"{r['fwd_ms'] / r['floor_ms']:.2f}"))
    harness.print_table(rows, [("case", "case"), ("scope", "scope"), ("dt", "dtype"), ("prov", "provider"),
                               ("fwd ms", "fwd"), ("fwdbwd ms", "fwdbwd"), ("extra MB", "peak"), ("peer", "peer"),
                               ("x peer fwd", "vs_peer_fwd"), ("x peer fb", "vs_peer_fb"),
                               ("x pub fwd", "vs_pub_fwd"), ("x pub fb", "vs_pub_fb"), ("x pub mem", "pub_mem_ratio"),
                               ("fwd/floor", "fwd_over_floor")],
                       title=f"\nSS2D on {gpu}: 'x peer' = peer time / ours (same run); 'x pub' = DESIGN.md published "
                             f"figure / ours; fwd/floor = ours / MUFU exp floor")


def sanitize(cases):
    """A cut-down forward + backward of each case (batch and channels cut) for compute-sanitizer."""
    for name in cases:
        case = SHAPES[name]
        small = ScanCase(name, min(case.Bt, 3 if case.H * case.W > 16 else 40), min(case.d_model, 4), case.H,
                         case.W, case.N)
        for lowrank in (False, True):
            inputs = scan_inputs(small, torch.bfloat16, "cuda", seed=0, lowrank=lowrank)
            leaves = {k: (v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
                      for k, v in inputs.items()}
            if lowrank:
                from vmambax_kernels.selective_scan import cuda
                y = cuda.selective_scan_2d_lowrank(leaves["u"], leaves["dt"], leaves["dt_projs_weight"], leaves["A"],
                                                   leaves["B"], leaves["C"], leaves["D"], leaves["delta_bias"], True,
                                                   torch.float32)
            else:
                y = vk.selective_scan_2d(**leaves, backend="cuda")
            y.backward(torch.randn_like(y))
            torch.cuda.synchronize()
            assert torch.isfinite(y).all(), name
        print(f"sanitize: {name} ok")


def profile(provider="cuda", name="enc1"):
    """One warm-up forward, then one forward + backward of one case (core, bf16), for Nsight Compute."""
    case = SHAPES[name]
    inputs = core_inputs(case, torch.bfloat16, case.Bt)
    fn = make_fn("core", provider)
    with torch.no_grad():
        fn(**inputs)
    leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
    y = fn(**leaves)
    y.backward(torch.randn_like(y))
    torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--scopes", default="core,op")
    ap.add_argument("--providers", default="cuda,triton,unfused")
    ap.add_argument("--quick", action="store_true", help=f"cases {','.join(QUICK)}, fewer repetitions")
    ap.add_argument("--no-record", action="store_true", help="print only; append nothing to benchmarks/results")
    ap.add_argument("--sanitize", action="store_true", help="cut-down fwd+bwd pass for compute-sanitizer")
    ap.add_argument("--profile", action="store_true",
                    help="one core fwd+bwd (bf16) for Nsight Compute: enc1, or the first of --cases when given")
    args = ap.parse_args(argv)
    if args.sanitize:
        return sanitize(args.cases.split(","))
    if args.profile:  # the first of --providers (cuda unless named) and of --cases (enc1 unless named)
        name = "enc1" if args.cases == ",".join(SHAPES) else args.cases.split(",")[0]
        if name not in SHAPES:
            raise SystemExit(f"--cases: expected names from {list(SHAPES)}, got {name!r}")
        return profile(args.providers.split(",")[0], name)
    if not torch.cuda.is_available():
        raise SystemExit("bench_ss2d: needs a CUDA GPU")
    if args.quick and args.cases == ",".join(SHAPES):
        args.cases = ",".join(QUICK)
    for c in args.cases.split(","):
        if c not in SHAPES:
            raise SystemExit(f"--cases: expected names from {list(SHAPES)}, got {c!r}")
    records = run(args)
    if records and not args.no_record:
        print(f"# appended {len(records)} records to {harness.results_path(records[0]['gpu'])}")


if __name__ == "__main__":
    main()
