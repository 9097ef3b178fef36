"""The ``vmambax`` command: thin parsers over typed functions (nnU-Net style).

    vmambax demo | synth | train | evaluate | predict | info

Each subcommand validates its flags and calls one function of ``vmambax.data`` / ``vmambax.engine``
that can be used from Python directly. Diagnostics go through ``logging``; results are printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("vmambax")


def _spacing(s: str) -> tuple[float, float]:
    try:
        parts = [float(v) for v in s.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected a pixel size 'ROW,COL' in mm (e.g. 0.98,0.98), got {s!r}")
    return parts[0], parts[1]


def _window(s: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'LOW,HIGH', got {s!r}") from None
    if hi <= lo:
        raise argparse.ArgumentTypeError(f"expected LOW < HIGH, got {s!r}")
    return lo, hi


def _model_arg(s: str) -> tuple[str, object]:
    key, sep, raw = s.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a constructor argument name, got {s!r}")
    try:  # numbers, true/false/null, lists in JSON; anything else is a string
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmambax", description="vMambaX PET-CT lung tumor segmentation.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="synthetic data, brief training of the full model, evaluation, figures")
    d.add_argument("--out", default="vmambax_demo", help="output folder (default: %(default)s)")
    d.add_argument("--patients", type=_positive, default=None)
    d.add_argument("--slices", type=_positive, default=None)
    d.add_argument("--size", type=_positive, default=None,
                   help="image side, a multiple of 32 (default: 64 on a CPU, 128 on a GPU)")
    d.add_argument("--epochs", type=_positive, default=None)
    d.add_argument("--batch-size", type=_positive, default=None)
    d.add_argument("--steps-per-epoch", type=_positive, default=None)
    d.add_argument("--device", default=None)
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--model", default=None, help=argparse.SUPPRESS)  # registered test models

    s = sub.add_parser("synth", help="write a synthetic PET-CT dataset in the PCLT20K layout")
    s.add_argument("--out", required=True)
    s.add_argument("--patients", type=_positive, default=20)
    s.add_argument("--size", type=_positive, default=512)
    s.add_argument("--slices", type=_positive, default=16, help="slices per patient (default: 16)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--nifti", action="store_true", help="also write NIfTI volumes (HU, SUV, labels) under OUT/nifti")

    t = sub.add_parser("train", help="train (the paper's recipe by default); use torchrun for several GPUs")
    t.add_argument("--data", required=True, help="dataset root (PCLT20K layout)")
    t.add_argument("--out", required=True, help="run folder: checkpoints, log, metrics.csv, curve")
    t.add_argument("--epochs", type=_positive, default=None, help="default 50")
    t.add_argument("--batch-size", type=_positive, default=None, help="global batch, default 8")
    t.add_argument("--lr", type=float, default=None, help="default 6e-5")
    t.add_argument("--weight-decay", type=float, default=None, help="default 0.01")
    t.add_argument("--size", type=_positive, default=None, help="training crop side, multiple of 32 (default 512)")
    t.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default=None,
                   help="mixed precision: auto (bf16 on GPUs that have it, else fp32), bf16, fp16 (loss scaling), off")
    t.add_argument("--no-amp", action="store_true", help="same as --amp off")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--steps-per-epoch", type=_positive, default=None)
    t.add_argument("--val-fraction", type=float, default=None, help="patients moved to val without val.txt (0.1)")
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--deterministic", action="store_true")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model (fuses the elementwise work around the kernels; the first steps compile)")
    t.add_argument("--cuda-graph", action="store_true",
                   help="replay the whole training step from one CUDA graph after 3 eager steps (one GPU, bf16 or "
                        "fp32; on an H200 the benchmark's step is 7-9%% faster compiled, 11-17%% eager, "
                        "the trainer's 11%% eager)")
    t.add_argument("--skip-bad", action="store_true", help="skip unreadable or mismatched slices and report them")
    t.add_argument("--init-checkpoint", default=None, help="start from these weights (ours or the published vMambaX)")
    t.add_argument("--backbone", default=None, help="VMamba-T v0 ImageNet weights for the shared encoder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoint_latest.pt")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--device", default=None)
    t.add_argument("--model-arg", action="append", type=_model_arg, default=[], metavar="KEY=VALUE",
                   help="a VMambaX constructor argument, repeatable (e.g. decoder_drop_path_rate=0, use_dcim=false); "
                        "saved in the checkpoint so evaluate/predict rebuild the same model")
    t.add_argument("--model", default=None, help=argparse.SUPPRESS)

    e = sub.add_parser("evaluate", help="IoU, Dice, HD95, balanced accuracy; summary.json and a figure")
    e.add_argument("--data", required=True)
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", default=None, help="default: <checkpoint folder>/eval_<split>")
    e.add_argument("--split", default="test")
    e.add_argument("--spacing", type=_spacing, default=None, help="pixel size ROW,COL in mm (default: dataset.json)")
    e.add_argument("--batch-size", type=_positive, default=4)
    e.add_argument("--policy", choices=("ours", "published"), default="ours",
                   help="empty-mask rule (default ours; 'published' reproduces the published code, for comparison)")
    e.add_argument("--figure-cases", type=int, default=4)
    _inference_args(e)

    r = sub.add_parser("predict", help="segment PNG pairs, folders of them, or NIfTI volumes")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--ct", required=True, help="CT: a PNG, a folder of PNGs, or a NIfTI volume (HU)")
    r.add_argument("--pet", required=True, help="PET: same kind as --ct (NIfTI in SUV)")
    r.add_argument("--out", required=True)
    r.add_argument("--threshold", type=float, default=0.5)
    r.add_argument("--ct-window", type=_window, default=None, help="NIfTI CT window in HU (default -1200,-200)")
    r.add_argument("--pet-window", type=_window, default=None, help="NIfTI PET window in SUV (default 0,10)")
    _inference_args(r)

    i = sub.add_parser("info", help="versions, device, kernel backends")
    i.add_argument("--json", action="store_true")
    return p


def _inference_args(sub):
    """The options evaluate and predict share: how the model runs."""
    sub.add_argument("--skip-bad", action="store_true", help="skip unreadable or mismatched inputs and report them")
    sub.add_argument("--device", default=None, help="default: the GPU when there is one, else the CPU")
    sub.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                     help="autocast dtype; auto: bf16 on a GPU that has it, else fp32")
    sub.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                     help="run the forward eagerly instead of replaying it from CUDA graphs on a GPU")
    sub.add_argument("--compile", action="store_true",
                     help="torch.compile the model first (about a minute per input size on a GPU; "
                          "pays on a dataset, ~10%% faster at 512x512)")


def _model_spec(name):
    return None if name is None else {"name": name, "kwargs": {}}


def _cmd_demo(a):
    from vmambax.engine.demo import DemoConfig, run_demo
    r = run_demo(DemoConfig(out=a.out, patients=a.patients, slices=a.slices, size=a.size, epochs=a.epochs,
                            batch_size=a.batch_size, steps_per_epoch=a.steps_per_epoch, device=a.device,
                            progress=not a.no_progress, model=_model_spec(a.model)))
    s, best, c = r["summary"], r["train"]["best"], r["config"]
    print(f"vmambax demo finished in {r['seconds']:.0f} s")
    print(f"  data      {r['data']}  ({r['dataset']['patients']} synthetic patients x "
          f"{r['dataset']['slices_per_patient']} slices, {c.size}x{c.size}, "
          f"patients per split {r['dataset']['splits']})")
    steps = sum(1 for _ in open(os.path.join(r["run"], "steps.csv"))) - 1
    model = "the full VMambaX" if c.model is None else f"model {c.model['name']}"
    print(f"  training  {r['run']}  ({model}, {c.epochs} epoch(s), {steps} steps of batch {c.batch_size}; "
          f"best val Dice {best['value']:.4f} at epoch {best['epoch']}; metrics.csv, training_curve.png, "
          "train.log, checkpoints)")
    print(f"  eval      {r['eval']}  (summary.json, qualitative.png)")
    _print_eval(s)
    print(r["table"])


def _print_eval(s):
    m, c = s["mean"], s["empty_counts"]
    print(f"  {s['split']}: {s['n_slices']} slices; Dice {m['dice_per_slice']:.4f} per-slice mean, "
          f"{m['dice_pooled']:.4f} pooled; IoU {m['iou_per_slice']:.4f} per-slice mean, {m['iou_pooled']:.4f} pooled; "
          f"HD95 {m['hd95_per_slice']:.2f} {s['units']['hd95']} per-slice mean; "
          f"balanced accuracy {m['balanced_accuracy_pooled']:.4f} pooled")
    print(f"  empty masks: {c['both_empty']} both empty, {c['pred_empty']} prediction empty only, "
          f"{c['target_empty']} ground truth empty only (policy: {s['empty_policy']})")


def _cmd_synth(a):
    from vmambax.data import make_synthetic_dataset
    d = make_synthetic_dataset(a.out, patients=a.patients, size=a.size, slices=a.slices, seed=a.seed, nifti=a.nifti)
    print(f"wrote {d['patients']} patients x {d['slices_per_patient']} slices ({a.size}x{a.size}) to {a.out}; "
          f"splits (patients) {d['splits']}; {d['slices_with_tumor']} slices with tumor")


def _cmd_train(a):
    from vmambax.engine.train import TrainConfig, train
    if a.no_amp and a.amp not in (None, "off"):
        raise ValueError(f"--no-amp contradicts --amp {a.amp}")
    given = {k: v for k, v in dict(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                                   size=a.size, amp="off" if a.no_amp else a.amp, seed=a.seed,
                                   steps_per_epoch=a.steps_per_epoch, val_fraction=a.val_fraction).items()
             if v is not None}
    cfg = TrainConfig(data=a.data, out=a.out, workers=a.workers, deterministic=a.deterministic, skip_bad=a.skip_bad,
                      init_checkpoint=a.init_checkpoint, backbone=a.backbone, resume=a.resume,
                      progress=not a.no_progress, device=a.device, compile=a.compile,
                      cuda_graph=a.cuda_graph, **given)
    if a.model:
        cfg.model = _model_spec(a.model)
    cfg.model = {"name": cfg.model["name"], "kwargs": {**cfg.model["kwargs"], **dict(a.model_arg)}}
    r = train(cfg)
    if r["history"] and os.environ.get("RANK", "0") == "0":
        print(f"trained to epoch {r['history'][-1]['epoch']}; best val Dice {r['best']['value']:.4f} at epoch "
              f"{r['best']['epoch']}; outputs in {r['out']}")


def _cmd_evaluate(a):
    from vmambax.engine.evaluate import evaluate, table_line
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.checkpoint)), f"eval_{a.split}")
    s = evaluate(a.data, a.checkpoint, out, split=a.split, spacing=a.spacing, batch_size=a.batch_size,
                 device=a.device, amp=a.amp, policy=a.policy, n_figure=a.figure_cases, skip_bad=a.skip_bad,
                 cuda_graphs=a.cuda_graphs, compile=a.compile)
    _print_eval(s)
    print(table_line("vMambaX", s))
    print(f"  wrote {os.path.join(out, 'summary.json')}" + (f" and {s['figure']}" if s["figure"] else ""))


def _cmd_predict(a):
    from vmambax.engine.predict import predict
    kw = {k: v for k, v in dict(ct_window=a.ct_window, pet_window=a.pet_window).items() if v is not None}
    written = predict(a.checkpoint, a.ct, a.pet, a.out, device=a.device, amp=a.amp, threshold=a.threshold,
                      skip_bad=a.skip_bad, cuda_graphs=a.cuda_graphs, compile=a.compile, **kw)
    print(f"wrote {len(written)} file(s) to {a.out}")


def _cmd_info(a):
    from vmambax.engine.info import format_info, info
    d = info()
    print(json.dumps(d, indent=2) if a.json else format_info(d))


_COMMANDS = {"demo": _cmd_demo, "synth": _cmd_synth, "train": _cmd_train, "evaluate": _cmd_evaluate,
             "predict": _cmd_predict, "info": _cmd_info}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        _COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, PermissionError) as exc:
        # User errors: one clear line, no traceback (use -v for one).
        if args.verbose:
            raise
        print(f"vmambax {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
