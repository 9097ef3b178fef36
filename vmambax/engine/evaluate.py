"""Evaluation as the paper reports it: IoU, Dice, HD95, balanced accuracy, params and FLOPs.

Per-slice means and values pooled over the split (TP, FP, FN summed over all slices first) are
both reported and labelled. Empty masks follow SPEC.md section 5 (``metrics.EMPTY_POLICY``) and
their counts are reported. HD95 is in mm when the pixel spacing is known (``dataset.json`` or
``spacing``), else in pixels.
"""
from __future__ import annotations

import heapq
import json
import logging
import math
import os
import time

import numpy as np
import torch

from vmambax import metrics
from vmambax.data import SliceDataset, read_spacing, read_split
from vmambax.engine import checkpoint as ckpt_io
from vmambax.engine.common import amp_dtype, check_writable, pick_device, same_size_batches
from vmambax.engine.inference import InferenceForward

log = logging.getLogger(__name__)


def _mean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def model_cost(model, size: tuple[int, int]) -> dict:
    """Parameters, and multiply-adds at ``size`` when ``vmambax.models.count_flops`` can count them."""
    out = {"params": int(sum(p.numel() for p in model.parameters())), "flops_g": None, "flops_input": list(size)}
    try:
        from vmambax.models import count_flops
        flops = count_flops(model, tuple(size))
        out["flops_g"] = float(flops["total"] if isinstance(flops, dict) else flops) / 1e9
    except Exception as exc:  # counting is informative only; say why it is missing
        log.warning("FLOPs not counted: %s", exc)
    return out


def table_line(name: str, s: dict) -> str:
    """A Table-1-style line: params, FLOPs, IoU, Dice, HD95, balanced accuracy."""
    m, c = s["mean"], s["model"]
    flops = f"{c['flops_g']:.1f} G @{c['flops_input'][0]}x{c['flops_input'][1]}" if c["flops_g"] is not None else "n/a"
    return (f"{name} | Params {c['params'] / 1e6:.2f} M | FLOPs {flops} | "
            f"IoU {100 * m['iou_per_slice']:.2f} % (pooled {100 * m['iou_pooled']:.2f}) | "
            f"Dice {100 * m['dice_per_slice']:.2f} % (pooled {100 * m['dice_pooled']:.2f}) | "
            f"HD95 {m['hd95_per_slice']:.2f} {s['units']['hd95']} | "
            f"bAcc {100 * m['balanced_accuracy_pooled']:.2f} % (pooled)")


@torch.no_grad()
def evaluate(data: str, checkpoint: str, out: str, split: str = "test", spacing: tuple[float, float] | None = None,
             batch_size: int = 4, device: str | None = None, amp: str = "auto", policy: str = "ours",
             n_figure: int = 4, skip_bad: bool = False, threshold: float = 0.5, cuda_graphs: bool = True,
             compile=False) -> dict:
    """Evaluate ``checkpoint`` on ``data/<split>.txt``; writes ``out/summary.json`` and
    ``out/qualitative.png`` and returns the summary dict. ``cuda_graphs``: on a GPU, replay the
    forward from CUDA graphs (``vmambax.engine.inference``; the same logits); ``compile``: run it
    through ``torch.compile`` (True, or a backend's name)."""
    if policy not in metrics.POLICIES:
        raise ValueError(f"policy: expected one of {metrics.POLICIES}, got {policy!r}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold: expected a probability in (0, 1), got {threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    check_writable(out)
    dev = pick_device(device)
    ds = SliceDataset(data, read_split(data, split), skip_bad=skip_bad)
    if spacing is None:
        spacing = read_spacing(data)
    unit = "mm" if spacing is not None else "pixels"
    sp = tuple(spacing) if spacing is not None else (1.0, 1.0)
    model, _ = ckpt_io.load_model(checkpoint)
    model.to(dev)
    infer = InferenceForward(model, dev, amp_dtype(amp, dev), graphs=cuda_graphs, compile=compile)
    logit_thr = math.log(threshold / (1 - threshold))

    shown: list = []  # (target pixels, -index, item, pred) of the cases the figure shows
    cases, pooled, counts = [], metrics.Confusion(), {"both_empty": 0, "pred_empty": 0, "target_empty": 0, "none": 0}
    t0 = time.perf_counter()
    for items in same_size_batches(ds, range(len(ds)), batch_size):
        ct, pet = (torch.stack([it[k] for it in items]).to(dev) for k in ("ct", "pet"))
        logits = infer(ct, pet)
        preds = (logits.float() > logit_thr).cpu().numpy()[:, 0]
        for it, p in zip(items, preds):
            _keep_for_figure(shown, n_figure, it, p)
            t = it["mask"].numpy()[0] > 0.5
            c = metrics.confusion(p, t)
            pooled += c
            kind = metrics.empty_case(p, t)
            counts[kind] += 1
            cases.append({"id": it["id"], "dice": metrics.dice(p, t, policy), "iou": metrics.iou(p, t, policy),
                          "hd95": metrics.hd95(p, t, sp, policy), "balanced_accuracy": c.balanced_accuracy,
                          "target_pixels": int(t.sum()), "pred_pixels": int(p.sum()), "empty": kind})
    secs = time.perf_counter() - t0
    H, W = ds[0]["ct"].shape[-2:]
    summary = {
        "checkpoint": os.path.basename(checkpoint), "data": os.path.basename(os.path.normpath(data)), "split": split,
        "n_slices": len(cases), "skipped": [sid for sid, _ in ds.skipped],
        "spacing": list(sp) if spacing is not None else None,
        "units": {"dice": "fraction", "iou": "fraction", "balanced_accuracy": "fraction", "hd95": unit},
        "empty_policy": metrics.EMPTY_POLICY if policy == "ours"
        else "published (centre pixel inserted; Dice of two empty masks 0)",
        "empty_counts": counts,
        "mean": {"dice_per_slice": _mean([c["dice"] for c in cases]), "iou_per_slice": _mean([c["iou"] for c in cases]),
                 "hd95_per_slice": _mean([c["hd95"] for c in cases]),
                 "balanced_accuracy_per_slice": _mean([c["balanced_accuracy"] for c in cases]),
                 "dice_pooled": pooled.dice, "iou_pooled": pooled.iou,
                 "balanced_accuracy_pooled": pooled.balanced_accuracy},
        "notes": {"per_slice": "mean over slices of the per-slice value",
                  "pooled": "TP, FP, FN (TN) summed over all slices, then the metric",
                  "balanced_accuracy_per_slice": "mean over slices whose target has both classes"},
        "model": model_cost(model, (int(H) + (-int(H)) % 32, int(W) + (-int(W)) % 32)),
        "seconds": secs, "device": str(dev), "cuda_graphs": infer.replaying, "compiled": infer.compiled, "cases": cases,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(_no_nan(summary), f, indent=2)  # undefined values (NaN) are written as null: valid JSON
    fig = _figure(shown, cases, os.path.join(out, "qualitative.png")) if shown else None
    summary["figure"] = fig
    log.info("evaluated %d slices of %s in %.1fs; empty masks: %s", len(cases), split, secs, counts)
    return summary


def _no_nan(x):
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _keep_for_figure(shown: list, n: int, it: dict, pred):
    # The cases with the largest tumors show the most; ties keep split order. Only n are kept, so a
    # split of any size costs no memory and no second forward pass.
    if n <= 0:
        return
    heapq.heappush(shown, (int(it["mask"].sum()), -int(it["index"]), it, pred))
    if len(shown) > n:
        heapq.heappop(shown)


def _figure(shown, cases, path):
    from vmambax.engine.figures import qualitative
    to8 = lambda x: np.round((x.numpy()[0] + 1.6) / 3.2 * 255).clip(0, 255).astype(np.uint8)  # noqa: E731
    shown = sorted(shown, key=lambda r: (-r[0], -r[1]))
    rows = [{"id": it["id"], "ct": to8(it["ct"]), "pet": to8(it["pet"]), "target": it["mask"].numpy()[0] > 0.5,
             "pred": pred, "dice": cases[-neg]["dice"]} for _, neg, it, pred in shown]
    qualitative(rows, path)
    return path
