"""Whole-model benchmark: vMambaX training step and inference at batch 8, 512x512 (DESIGN.md).

    python benchmarks/bench_model.py                        # cuda/triton/unfused, bf16 + fp16
    python benchmarks/bench_model.py --providers cuda --dtypes bf16 --no-split
    python benchmarks/bench_model.py --providers triton --dtypes bf16 --compile --profile

Per provider and autocast dtype: one training step (forward, backward, AdamW) and one inference
batch, medians of CUDA-event timings after warm-up, peak memory of the step, pairs/s; then the
split of a training step's forward+backward between encoder (both branches), CGM, DCIM and decoder,
each part timed alone on the inputs the full model gives it. Records go to
benchmarks/results/<gpu>.jsonl (bench "model", cases "train" / "infer" / "part_<name>").
--compile [MODE] runs the model through torch.compile (records carry "compiled": MODE); --adamw
foreach,fused times PyTorch's two AdamW implementations (fused by default, as the trainer on CUDA; records of fused carry "adamw": "fused"); --profile prints
the CUDA kernels of one training step, then of one inference, grouped into scan / CGM / GEMM / normalisation / other, the
answer to "where does the remaining time go". Providers: "cuda" and "triton" set the model's backend; "unfused_mamba" swaps SS2D's core for
PyTorch cross-scan + mamba-ssm's selective_scan_fn + cross-merge (the published path's structure).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402
from benchmarks.bench_ss2d import unfused_core  # noqa: E402
from vmambax.engine.graph_step import GraphedTrainStep  # noqa: E402
from vmambax.models import VMambaX  # noqa: E402
from vmambax.models.fusion import dcim  # noqa: E402
from vmambax_kernels.modules import LayerNorm, SS2D  # noqa: E402
from vmambax_kernels import available_backends  # noqa: E402
from vmambax_kernels.modules import ss2d as ss2d_module  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# DESIGN.md, the published implementation on one H100 (fp16 autocast, batch 8, 512x512).
PUBLISHED = {"train_step_ms": 643.0, "infer_ms": 216.0, "peak_gb": 37.6}
PUBLISHED_PARTS = {"encoder": 263.0, "dcim": 189.0, "decoder": 157.0, "cgm": 13.0}


@contextlib.contextmanager
def provider_setup(model: VMambaX, provider: str, glue: str = "fused"):
    """Point every fused op of ``model`` at ``provider``; restore on exit. ``glue`` "torch" keeps
    SS2D's input conv and output gate and the model's LayerNorms on PyTorch ops (before/after in
    one run); the unfused peer always does, as the published model."""
    keep_torch = glue == "torch" or provider == "unfused_mamba"
    for m in model.modules():
        if isinstance(m, SS2D):
            m.fused_dwconv = m.fused_norm_gate = False if keep_torch else None
        elif isinstance(m, LayerNorm):
            m.fused = False if keep_torch else None
    if provider == "unfused_mamba":
        core = unfused_core("unfused_mamba")
        original = ss2d_module.cross_selective_scan_2d
        ss2d_module.cross_selective_scan_2d = lambda *a, backend=None: core(*a)
        model.set_backend(None)
        try:
            yield
        finally:
            ss2d_module.cross_selective_scan_2d = original
    else:
        model.set_backend(provider)
        yield


def parts(model: VMambaX, ct, pet):
    """(name, fn) pairs that run each part's forward on the inputs the full model gives it."""
    bb = model.backbone
    with torch.no_grad():
        x = torch.cat([ct.expand(-1, 3, -1, -1), pet.expand(-1, 3, -1, -1)])
        feats = [f.detach() for f in bb.vssm(x)]
        Bt = ct.shape[0]
        pairs = [(f[:Bt], f[Bt:]) for f in feats]
        gated = [tuple(t.detach() for t in bb.modal_fusion[i](*pairs[i])) for i in range(4)]
        fused = [(g[0] + g[1] + dcim(bb.region_patch[i], bb.channel_attn_mamba[i], *g)).detach()
                 for i, g in enumerate(gated)]
    leaf = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return [
        ("encoder", lambda: bb.vssm(leaf(x))),
        ("cgm", lambda: [bb.modal_fusion[i](leaf(a), leaf(b)) for i, (a, b) in enumerate(pairs)]),
        ("dcim", lambda: [dcim(bb.region_patch[i], bb.channel_attn_mamba[i], leaf(a), leaf(b))
                          for i, (a, b) in enumerate(gated)]),
        ("decoder", lambda: model.decode_head([leaf(f) for f in fused])),
    ]


def _backward_all(out):
    outs = out if isinstance(out, (list, tuple)) else [out]
    flat = [t for o in outs for t in (o if isinstance(o, (list, tuple)) else [o])]
    torch.autograd.backward(flat, [torch.ones_like(t) for t in flat])


# kernel-name fragments -> group, first match wins (names of our ops, cuBLAS/cuDNN and inductor)
KERNEL_GROUPS = (("scan", ("ss2d", "selective_scan", "scan_2d", "_scan_")), ("cgm", ("cgm",)),
                 ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "wgmma", "conv", "implicit")),
                 ("norm", ("layer_norm", "batch_norm", "bn_", "welford", "norm")))


def kernel_split(step, steps: int = 3) -> None:
    """Print where the GPU time of one call of ``step`` (a training step or an inference) goes, by
    kernel group and the top kernels."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    groups, kernels = {}, []
    for ev in prof.key_averages():
        us = ev.device_time_total / steps
        # kernels only: not the ops launching them, nor a range annotation's span on the device (the
        # optimizer's "Optimizer.step#AdamW.step" covered 16-27 ms of a compiled step, its own kernels and
        # the gaps between them, and was counted in "other" until this check)
        if us <= 0 or ev.device_type != torch.autograd.DeviceType.CUDA or getattr(ev, "is_user_annotation", False):
            continue
        name = ev.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + us
        kernels.append((us, group, ev.key[:90]))
    total = sum(groups.values())
    print(f"  GPU time per step {total / 1e3:.1f} ms: " + ", ".join(
        f"{g} {us / 1e3:.1f} ms ({100 * us / total:.0f}%)" for g, us in sorted(groups.items(), key=lambda x: -x[1])))
    for us, group, name in sorted(kernels, reverse=True)[:15]:
        print(f"    {us / 1e3:8.2f} ms  {group:6s} {name}")
    # Which PyTorch ops (and which lines of the model) launch the kernels outside the scan and the
    # GEMMs: the "other" group's elementwise and copy kernels say nothing about their callers.
    print("  PyTorch ops by the GPU time of their own kernels, with the model line that called them "
          "('?': called from the autograd engine's thread, which has no Python stack):")
    ops = [ev for ev in prof.key_averages(group_by_stack_n=6) if ev.device_type == torch.autograd.DeviceType.CPU
           and ev.self_device_time_total > 0 and ev.key.startswith("aten::")]
    for ev in sorted(ops, key=lambda e: -e.self_device_time_total)[:20]:
        where = next((f for f in ev.stack if "vmambax" in f and "bench_model" not in f), ev.stack[0] if ev.stack else "?")
        print(f"    {ev.self_device_time_total / steps / 1e3:8.2f} ms  {ev.key:28s} {where}")


def graphed_step_ms(model, run, ct, pet, target, dtype, iters: int, say) -> float | None:
    """The trainer's step replayed from one CUDA graph (``vmambax train --cuda-graph``:
    vmambax.engine.graph_step, its seg_loss and a fused capturable AdamW of its own): the step's
    device time without the host's launches, which the compiled step waits on (at aa6f50a an H200
    with a slow host took 253 ms per step for 206 ms of kernels). None, with the reason said, where
    capture fails."""
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01, fused=True)
    step = GraphedTrainStep(run, opt, torch.device("cuda"), dtype)
    batch = {"ct": ct, "pet": pet, "mask": target}
    try:
        for _ in range(step.warmup + 1):   # the warm-up steps, then the capture and its first replay
            step(batch)
        ms = harness.events_median_ms(lambda: step(batch), warmup=2, iters=iters)
    except RuntimeError as exc:  # e.g. an op that syncs with the host: report, keep the other figures
        say(f"training step from a CUDA graph: capture failed ({exc})")
        return None
    finally:
        del step
        model.zero_grad(set_to_none=True)  # drop the graph pool's grads before the next steps
        torch.cuda.synchronize()
    say(f"training step replayed from a CUDA graph {ms:.1f} ms")
    return ms


def bench_one(provider: str, dtype_name: str, batch: int, size: int, iters: int, split: bool,
              compiled: str | None = None, profile: bool = False, glue: str = "fused",
              graph: bool = False, adamw: str = "fused", infer_only: bool = False,
              train_only: bool = False) -> list[dict]:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = VMambaX().cuda().train()
    run = torch.compile(model, mode=compiled) if compiled else model
    # fused (one kernel per tensor group; the trainer's choice on CUDA) or foreach (PyTorch's default
    # on CUDA): the compiled step's profile gave the optimizer a 16-27 ms device span against ~2.4 ms
    # of its own kernels, and fused took 2.6 % off the compiled step on an H200
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01, **{adamw: True})
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    ct = torch.rand(batch, 1, size, size, device="cuda") * 3.2 - 1.6
    pet = torch.rand(batch, 1, size, size, device="cuda") * 3.2 - 1.6
    target = (torch.rand(batch, 1, size, size, device="cuda") > 0.9).float()
    env = harness.env_info()
    recs = []
    t0 = time.perf_counter()

    def say(msg):  # each figure as soon as it exists: a call cut short by its time limit still shows them
        print(f"  [{time.perf_counter() - t0:6.1f} s] {provider}/{dtype_name}: {msg}", flush=True)

    with provider_setup(model, provider, glue):
        def step():
            with torch.autocast("cuda", dtype=dtype):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(run(ct, pet).float(), target)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return loss

        def infer():
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                return run(ct, pet)

        if not infer_only:
            loss = step()
            if not torch.isfinite(loss):
                raise RuntimeError(f"{provider}/{dtype_name}: non-finite training loss {loss.item()}")
            # the loss' autograd graph keeps the parameters' AccumulateGrad nodes alive, and they keep the
            # stream they were made on: the graph step's capture on a side stream then waits on the
            # default stream and is invalidated (cudaErrorStreamCaptureInvalidated, H200)
            del loss
            torch.cuda.synchronize()
            say("first training step done" + (" (compiled)" if compiled else ""))
            torch.cuda.reset_peak_memory_stats()
            train_ms = harness.events_median_ms(step, warmup=2, iters=iters)
            peak_gb = torch.cuda.max_memory_allocated() / 1e9
            say(f"training step {train_ms:.1f} ms, peak {peak_gb:.2f} GB")
            train_graph_ms = (graphed_step_ms(model, run, ct, pet, target, dtype, iters, say)
                              if graph and dtype != torch.float16 else None)  # fp16: GradScaler syncs
        infer_ms = graph_ms = None
        if not train_only:
            model.eval()
            if compiled:  # compiling for eval happens here, outside the timed region
                infer()
                torch.cuda.synchronize()
                say(f"first inference done (compiled, {compiled})")
            infer_ms = harness.events_median_ms(infer, warmup=2, iters=iters)
            say(f"inference {infer_ms:.1f} ms")
            graph_ms = harness.events_median_ms(harness.cuda_graph(infer), warmup=2, iters=iters) if graph else None
            model.train()
        extra = {"compiled": compiled} if compiled else {}
        if graph_ms is not None:
            extra["infer_graph_ms"] = graph_ms
        extra["glue"] = "torch" if provider == "unfused_mamba" else glue
        # the fused ops' switches set in the environment (e.g. VMAMBAX_FUSED_UP2=0), so an A/B by
        # environment in one call leaves records that say which path ran
        extra.update({k.lower(): v for k, v in sorted(os.environ.items()) if k.startswith("VMAMBAX_FUSED_")})
        if adamw != "foreach":
            extra["adamw"] = adamw
        if not infer_only:
            tg = {} if train_graph_ms is None else {"train_graph_ms": train_graph_ms}
            recs.append(harness.record("model", "train", provider, dtype_name, batch, env, train_step_ms=train_ms,
                                       pairs_per_s=batch / train_ms * 1e3, peak_gb=peak_gb,
                                       **{k: v for k, v in extra.items() if k != "infer_graph_ms"}, **tg))
        if not train_only:
            recs.append(harness.record("model", "infer", provider, dtype_name, batch, env, infer_ms=infer_ms,
                                       pairs_per_s=batch / infer_ms * 1e3, **extra))
        if profile:
            if not infer_only:
                print(f"{provider}/{dtype_name}{f' compiled ({compiled})' if compiled else ''}: kernels of a training step")
                kernel_split(step)
            if not train_only:
                print(f"{provider}/{dtype_name}: kernels of an inference forward (eval mode)")
                model.eval()
                kernel_split(infer)
                model.train()
        if split and not infer_only:
            for name, fn in parts(model, ct, pet):
                def fwdbwd(fn=fn):
                    with torch.autocast("cuda", dtype=dtype):
                        out = fn()
                    _backward_all(out)
                recs.append(harness.record("model", f"part_{name}", provider, dtype_name, batch, env,
                                           fwdbwd_ms=harness.events_median_ms(fwdbwd, warmup=1, iters=max(3, iters // 2))))
    del model, opt
    torch.cuda.empty_cache()
    return recs


def providers_here(requested: list[str]) -> list[str]:
    status = available_backends()
    out = []
    for p in requested:
        if p in ("cuda", "triton"):
            if status[p].available:
                out.append(p)
            else:
                print(f"skipping provider {p}: {status[p].reason}")
        elif p == "unfused_mamba":
            try:
                import mamba_ssm  # noqa: F401
                out.append(p)
            except ImportError as exc:
                print(f"skipping provider unfused_mamba: mamba_ssm not importable ({exc})")
        else:
            raise SystemExit(f"--providers: unknown provider {p!r}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--providers", default="cuda,triton,unfused_mamba")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-split", action="store_true", help="skip the per-part split")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                    help="torch.compile the model (MODE: default | reduce-overhead, which adds CUDA graphs)")
    ap.add_argument("--profile", action="store_true", help="print the kernel split of a training step")
    ap.add_argument("--graph", action="store_true", help="also time inference and the bf16 / fp32 training "
                    "step replayed from CUDA graphs")
    ap.add_argument("--infer-only", action="store_true", help="time inference only (no training step, no split)")
    ap.add_argument("--train-only", action="store_true", help="time the training step only (no inference: a "
                    "compiled run then compiles once)")
    ap.add_argument("--glue", default="fused", help="SS2D's input conv and output gate and the model's LayerNorms: "
                    "fused (Triton ops; the LayerNorm op in inference only unless VMAMBAX_FUSED_LAYER_NORM=train), "
                    "torch (PyTorch ops), or both as fused,torch to time before/after in one run")
    ap.add_argument("--adamw", default="fused", help="AdamW implementation: fused (the trainer's on CUDA), "
                    "foreach, or both as foreach,fused to time before/after in one run")
    args = ap.parse_args(argv)
    if args.infer_only and args.train_only:
        raise SystemExit("--infer-only and --train-only exclude each other")
    adamws = args.adamw.split(",")
    if not set(adamws) <= {"foreach", "fused"}:
        raise SystemExit(f"--adamw: expected foreach and/or fused, got {args.adamw!r}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_model.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    recs = []
    for provider in providers_here(args.providers.split(",")):
        for dt, glue, adamw in ((d, g, a) for d in args.dtypes.split(",") for g in args.glue.split(",")
                                for a in adamws):
            if provider == "unfused_mamba" and glue != args.glue.split(",")[0]:
                continue  # the peer has one glue only (PyTorch's)
            try:
                recs += bench_one(provider, dt, args.batch, args.size, args.iters, not args.no_split,
                                  args.compile, args.profile, glue, args.graph, adamw, args.infer_only,
                                  args.train_only)
            except (RuntimeError, torch.OutOfMemoryError) as exc:  # report and go on with the others
                print(f"{provider}/{dt}/glue {glue}: FAILED: {exc}")
                torch.cuda.empty_cache()
    print(f"\nvMambaX batch {args.batch}, {args.size}x{args.size}, on {gpu}; published (H100, fp16): "
          f"train {PUBLISHED['train_step_ms']} ms, infer {PUBLISHED['infer_ms']} ms, {PUBLISHED['peak_gb']} GB")
    rows = []
    for r in recs:
        row = dict(r)
        peer = next((q for q in recs if q["provider"] == "unfused_mamba" and q["case"] == r["case"]
                     and q["dtype"] == r["dtype"]), None)
        fig = "train_step_ms" if r["case"] == "train" else "infer_ms" if r["case"] == "infer" else "fwdbwd_ms"
        row["ms"] = r.get(fig)
        row["graph_ms"] = r.get("train_graph_ms" if r["case"] == "train" else "infer_graph_ms")
        row["vs_peer"] = harness.ratio(r.get(fig), peer.get(fig) if peer else None)
        pub = PUBLISHED.get(fig) if r["case"] in ("train", "infer") else PUBLISHED_PARTS.get(r["case"][5:])
        row["vs_published"] = harness.ratio(r.get(fig), pub) if r["dtype"] == "fp16" else "-"
        rows.append(row)
    harness.print_table(rows, [("case", "case"), ("provider", "provider"), ("dtype", "dtype"), ("glue", "glue"),
                               ("adamw", "adamw"),
                               ("ms", "ms"), ("graph ms", "graph_ms"), ("pairs/s", "pairs_per_s"), ("peak GB", "peak_gb"), ("x peer", "vs_peer"),
                               ("x published", "vs_published")])
    if recs and not args.no_save:
        print("appended to", harness.append_records(recs))


if __name__ == "__main__":
    main()
