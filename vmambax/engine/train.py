"""Training: the published vMambaX recipe by default, resumable, single device or torchrun DDP.

Recipe: AdamW (lr 6e-5, weight decay 0.01), cosine schedule per step, 50 epochs, global batch 8,
512x512 crops, flips + shift/scale + random crop, BCE + soft Dice. Outputs in ``out``:
``checkpoint_{latest,best,final}.pt``, ``train.log``, ``metrics.csv`` (one row per epoch),
``steps.csv`` (loss per step), ``training_curve.png``, ``config.json``.

Determinism of a resumed run: the data order and each sample's augmentation are functions of
(seed, epoch, index), and the global RNG is re-seeded from (seed, epoch) at every epoch, so a run
resumed from the checkpoint of epoch e continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from vmambax import metrics
from vmambax.data import Augmented, SliceDataset, derive_val, has_split, read_split
from vmambax.data.dataset import DataError
from vmambax.engine import checkpoint as ckpt_io
from vmambax.engine.common import (AMP_CHOICES, MULTIPLE, amp_dtype, autocast, check_writable,
                                   deterministic_algorithms, forward_padded, has_batchnorm, pick_device,
                                   same_size_batches, seg_loss, unwrap)
from vmambax.engine.graph_step import GraphedTrainStep, check_graph_step, portable_state

log = logging.getLogger(__name__)

# Fields that change the result: on --resume the checkpoint's values are used.
_RUN_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "size", "amp", "seed", "steps_per_epoch",
               "val_fraction", "model")


@dataclass
class TrainConfig:
    data: str
    out: str
    epochs: int = 50
    batch_size: int = 8                # global: split evenly over the torchrun processes
    lr: float = 6e-5
    weight_decay: float = 0.01
    size: int | None = 512             # square training crop; None: the images' own size
    amp: str = "auto"                  # auto | bf16 | fp16 | off
    seed: int = 0
    workers: int = 2
    steps_per_epoch: int | None = None  # cap per epoch (short runs); None: the whole split
    val_fraction: float = 0.1          # patients moved from train to val when there is no val.txt
    deterministic: bool = False
    skip_bad: bool = False
    init_checkpoint: str | None = None
    backbone: str | None = None
    resume: bool = False
    progress: bool = True
    device: str | None = None
    compile: bool = False              # torch.compile the model's forward (nn.Module.compile: same state dict)
    cuda_graph: bool = False           # replay the whole step from one CUDA graph (engine/graph_step.py)
    model: dict = field(default_factory=lambda: {"name": ckpt_io.DEFAULT_MODEL, "kwargs": {"num_classes": 1}})


def _check_config(cfg: TrainConfig):
    for name in ("epochs", "batch_size"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if cfg.steps_per_epoch is not None and cfg.steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: expected a positive integer or None, got {cfg.steps_per_epoch!r}")
    if cfg.size is not None and (cfg.size < MULTIPLE or cfg.size % MULTIPLE):
        raise ValueError(f"size: expected a multiple of {MULTIPLE} (the model's constraint), got {cfg.size}")
    if not (cfg.lr > 0 and cfg.weight_decay >= 0):
        raise ValueError(f"lr and weight_decay: expected lr > 0 and weight_decay >= 0, "
                         f"got {cfg.lr}, {cfg.weight_decay}")
    if cfg.amp not in AMP_CHOICES:
        raise ValueError(f"amp: expected one of {AMP_CHOICES}, got {cfg.amp!r}")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {cfg.val_fraction}")
    if cfg.resume and (cfg.init_checkpoint or cfg.backbone):
        raise ValueError("resume: cannot be combined with init_checkpoint or backbone "
                         "(the run's own weights are restored)")
    if not os.path.isdir(cfg.data):
        raise FileNotFoundError(f"data: the dataset folder {cfg.data} does not exist")


class _Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.started = False

    def start(self, device: torch.device):
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.started = True

    def sum(self, values: list[float], device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def stop(self):
        if self.started:
            dist.destroy_process_group()


def _splits(cfg: TrainConfig):
    train_ids = read_split(cfg.data, "train")
    if has_split(cfg.data, "val"):
        val_ids = read_split(cfg.data, "val")
        source = "val.txt"
    else:
        train_ids, val_ids = derive_val(train_ids, cfg.val_fraction, cfg.seed)
        source = f"derived per patient from train.txt ({cfg.val_fraction:.0%} of patients)"
    train_ds = SliceDataset(cfg.data, train_ids, skip_bad=cfg.skip_bad)
    val_ds = SliceDataset(cfg.data, val_ids, skip_bad=cfg.skip_bad)
    return train_ds, val_ds, source


def _epoch_batches(n: int, per_device: int, d: _Dist, seed: int, epoch: int, cap: int | None):
    # One global order per epoch, dealt out to the processes; the last partial batch is dropped
    # (a batch of one would break BatchNorm).
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_step = per_device * d.world
    steps = n // per_step if cap is None else min(cap, n // per_step)
    return [order[s * per_step + d.rank * per_device:s * per_step + (d.rank + 1) * per_device] for s in range(steps)]


def _cosine(total: int):
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


@torch.no_grad()
def validate(model: nn.Module, ds, device, dtype, d: _Dist, batch_size: int = 4) -> dict:
    """Validation loss, per-slice mean Dice/IoU (SPEC policy for empty masks) and pooled Dice/IoU."""
    model.eval()
    idx = list(range(d.rank, len(ds), d.world))
    loss_sum = dice_sum = iou_sum = 0.0
    pooled = metrics.Confusion()
    for items in same_size_batches(ds, idx, batch_size):
        ct, pet, mask = (torch.stack([it[k] for it in items]).to(device) for k in ("ct", "pet", "mask"))
        with autocast(device, dtype):
            logits = forward_padded(model, ct, pet)
        loss_sum += float(seg_loss(logits, mask)) * len(items)
        pred = (logits.float() > 0).cpu().numpy()[:, 0]
        for p, t in zip(pred, mask.cpu().numpy()[:, 0]):
            c = metrics.confusion(p, t)
            dice_sum, iou_sum = dice_sum + c.dice, iou_sum + c.iou
            pooled += c
    n, loss_sum, dice_sum, iou_sum, tp, fp, fn = d.sum(
        [len(idx), loss_sum, dice_sum, iou_sum, pooled.tp, pooled.fp, pooled.fn], device)
    pooled = metrics.Confusion(int(tp), int(fp), int(fn), 0)
    return {"val_loss": loss_sum / n, "val_dice": dice_sum / n, "val_iou": iou_sum / n,
            "val_dice_pooled": pooled.dice, "val_iou_pooled": pooled.iou}


def _rng_state():
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def train(cfg: TrainConfig, model_factory=None) -> dict:
    """Train as ``cfg`` says; returns ``{"out", "best", "history", "checkpoints"}``.

    ``model_factory()`` overrides building ``cfg.model`` (the checkpoint still records
    ``cfg.model``, so evaluation can rebuild the model only when that spec is registered).
    ``cfg.deterministic`` switches torch's deterministic algorithms on for the run only.
    """
    with deterministic_algorithms(cfg.deterministic):
        return _train(cfg, model_factory)


def _train(cfg: TrainConfig, model_factory) -> dict:
    _check_config(cfg)
    d = _Dist()
    device = pick_device(cfg.device)
    if d.world > 1 and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    check_writable(cfg.out)
    latest = os.path.join(cfg.out, "checkpoint_latest.pt")
    state = None
    if cfg.resume:
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"resume: there is no {latest} to resume from")
        state = ckpt_io.load(latest)
        if not ckpt_io.is_ours(state):
            raise ckpt_io.CheckpointError(f"resume: {latest} is not a vmambax training checkpoint")
        saved = state["config"]
        changed = [f for f in _RUN_FIELDS if saved.get(f) != getattr(cfg, f)]
        if changed:
            log.warning("resume: using the run's own %s (ignoring the values given now)", ", ".join(changed))
        cfg = dataclasses.replace(cfg, **{f: saved[f] for f in _RUN_FIELDS})
    elif os.path.exists(latest):
        raise ValueError(f"out: {cfg.out} already holds a run ({latest}); pass resume to continue it "
                         "or choose another folder (nothing was overwritten)")
    if cfg.batch_size % d.world:
        raise ValueError(f"batch_size: the global batch must divide evenly over {d.world} processes, "
                         f"got {cfg.batch_size}")
    per_device = cfg.batch_size // d.world
    if cfg.cuda_graph:
        check_graph_step(device, amp_dtype(cfg.amp, device), d.world)
    torch.manual_seed(cfg.seed)

    train_ds, val_ds, val_source = _splits(cfg)
    sizes = train_ds.sizes | val_ds.sizes
    crop = cfg.size or min(min(s) for s in train_ds.sizes)
    if cfg.size is None and crop % MULTIPLE:
        raise ValueError(f"size: the images are {sorted(sizes)}, not a multiple of {MULTIPLE}; pass a crop size")
    model = model_factory() if model_factory else ckpt_io.build_model(cfg.model)
    sync_bn = d.world > 1 and device.type == "cuda"  # PyTorch's SyncBatchNorm runs on GPUs only
    if has_batchnorm(model) and per_device < 2 and not sync_bn:
        raise ValueError(f"batch_size: the model has BatchNorm (CGM's channel gate), which needs at least 2 samples "
                         f"per device to train (or several GPU processes under torchrun, whose BatchNorm is "
                         f"synchronised); got {per_device} per device")
    if len(train_ds) < cfg.batch_size:
        raise DataError(f"train split: {len(train_ds)} usable slices, fewer than one batch of {cfg.batch_size}")
    if cfg.init_checkpoint:
        ckpt_io.init_weights(model, cfg.init_checkpoint)
    if cfg.backbone:
        from vmambax.models import load_vmamba_backbone
        rep = load_vmamba_backbone(model, cfg.backbone)
        log.info("backbone %s: %d tensors used, %d skipped, %d encoder tensors not in the file", cfg.backbone,
                 len(rep.used), len(rep.skipped), len(rep.missing))
    model.to(device)
    d.start(device)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.compile:  # in place, after the BatchNorm swap and before DDP: checkpoints keep their keys
        model.compile()
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    dtype = amp_dtype(cfg.amp, device)
    n_steps = len(_epoch_batches(len(train_ds), per_device, d, cfg.seed, 0, cfg.steps_per_epoch))
    # fused on CUDA (one kernel per tensor group): the compiled step on an H200 took 233.0 ms against
    # 239.3 / 237.4 with the default foreach AdamW (same call, A-B-A); the CPU keeps the default.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda" or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(cfg.epochs * n_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start, history, best = 0, [], {"metric": "val_dice", "value": -1.0, "epoch": None}
    if state is not None:
        ckpt_io.load_weights(unwrap(model), state["model"], latest)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, history, best = state["epoch"], list(state["history"]), dict(state["best"])
        torch.set_rng_state(state["rng"]["torch"])
        log.info("resumed %s at epoch %d of %d", latest, start, cfg.epochs)
        if d.rank == 0:
            _truncate_steps(os.path.join(cfg.out, "steps.csv"), start)
    # after the optimizer's state is loaded: it turns that state capturable
    graphed = GraphedTrainStep(model, opt, device, dtype) if cfg.cuda_graph else None

    rank0 = d.rank == 0
    handler = _start_log(cfg, rank0, train_ds, val_ds, val_source, crop, dtype, d, model)
    aug = Augmented(train_ds, (crop, crop), cfg.seed)
    paths = {k: os.path.join(cfg.out, f"checkpoint_{k}.pt") for k in ("latest", "best", "final")}
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            torch.manual_seed((cfg.seed * 100_003 + epoch) * 1_009 + d.rank)  # dropout/drop-path: same on resume
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            aug.set_epoch(epoch)
            batches = _epoch_batches(len(train_ds), per_device, d, cfg.seed, epoch, cfg.steps_per_epoch)
            loader = torch.utils.data.DataLoader(aug, batch_sampler=batches, num_workers=cfg.workers,
                                                 pin_memory=device.type == "cuda")
            lr = float(opt.param_groups[0]["lr"])
            train_loss = _train_epoch(model, loader, opt, sched, scaler, device, dtype, d, cfg, epoch, rank0,
                                      graphed)
            step_ms = (time.perf_counter() - t0) * 1000 / len(batches)
            val = validate(unwrap(model), val_ds, device, dtype, d)
            new_best = val["val_dice"] > best["value"]
            if new_best:
                best = {"metric": "val_dice", "value": val["val_dice"], "epoch": epoch + 1}
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, **val,
                   "epoch_s": time.perf_counter() - t0, "step_ms": step_ms,
                   "peak_mem_gb": _peak_bytes(device, graphed) / 1e9,
                   "new_best": new_best}
            history.append(row)
            if rank0:
                state = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "model_spec": cfg.model,
                         "model": unwrap(model).state_dict(), "optimizer": portable_state(opt),
                         "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                         "best": best, "history": history, "config": dataclasses.asdict(cfg), "rng": _rng_state(),
                         "image_size": [crop, crop]}
                ckpt_io.save_atomic(state, paths["latest"])
                if new_best:
                    ckpt_io.save_atomic(state, paths["best"])
                _epoch_outputs(cfg.out, history)
                log.info("epoch %d/%d  lr %.2e  train_loss %.4f  val_loss %.4f  val_dice %.4f  val_iou %.4f  "
                         "(pooled %.4f / %.4f)  %.1fs%s", epoch + 1, cfg.epochs, lr, train_loss, val["val_loss"],
                         val["val_dice"], val["val_iou"], val["val_dice_pooled"], val["val_iou_pooled"],
                         row["epoch_s"], "  new best" if new_best else "")
        if rank0:
            final = ckpt_io.load(paths["latest"])
            ckpt_io.save_atomic(final, paths["final"])
            log.info("done: best val_dice %.4f at epoch %s; checkpoints in %s", best["value"], best["epoch"], cfg.out)
    finally:
        if handler is not None:
            logging.getLogger("vmambax").removeHandler(handler)
            logging.getLogger("vmambax").setLevel(handler.restore_level)
            handler.close()
        # Free the DDP wrapper, whose reducer holds the process group, before the group is torn down:
        # a gloo group left to the interpreter's shutdown aborted the process at exit now and then
        # ("terminate called without an active exception", no Python frame; 3 of 20 two-process
        # runs on a loaded 2-core machine).
        model = opt = sched = None
        gc.collect()
        d.stop()
    return {"out": cfg.out, "best": best, "history": history, "checkpoints": paths}


def _peak_bytes(device, graphed) -> int:
    """This epoch's peak device memory; with --cuda-graph at least what the captured step holds."""
    if device.type != "cuda":
        return 0
    return max(torch.cuda.max_memory_allocated(device), graphed.held_bytes if graphed is not None else 0)


def _train_epoch(model, loader, opt, sched, scaler, device, dtype, d, cfg, epoch, rank0, graphed=None) -> float:
    from tqdm import tqdm
    model.train()
    total, n = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not (cfg.progress and rank0),
               dynamic_ncols=True)
    steps_csv = os.path.join(cfg.out, "steps.csv")
    rows = []
    for step, batch in enumerate(bar):
        if graphed is not None:   # the whole step, then the loss' check (graph_step.py)
            loss = graphed(batch)
            _check_finite(loss, epoch, step)
        else:
            ct, pet, mask = (batch[k].to(device, non_blocking=True) for k in ("ct", "pet", "mask"))
            with autocast(device, dtype):
                logits = model(ct, pet)
            loss = seg_loss(logits, mask)
            _check_finite(loss, epoch, step)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        lr = float(opt.param_groups[0]["lr"])
        sched.step()
        (global_loss,) = d.sum([loss.item() / d.world], device)
        total, n = total + global_loss, n + 1
        rows.append((epoch + 1, step, f"{lr:.6e}", f"{global_loss:.6f}"))
        bar.set_postfix(loss=f"{global_loss:.4f}")
    if rank0:
        new = not os.path.exists(steps_csv)
        with open(steps_csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["epoch", "step", "lr", "loss"])
            w.writerows(rows)
    return total / max(n, 1)


def _check_finite(loss: torch.Tensor, epoch: int, step: int):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"epoch {epoch + 1}, step {step}: the loss is {loss.item()}; "
                                 "try --amp off or a lower lr")


def _truncate_steps(path: str, epoch: int):
    # Steps of an epoch that was cut before its checkpoint are run again: drop their old rows.
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if int(r[0]) <= epoch])


def _start_log(cfg, rank0, train_ds, val_ds, val_source, crop, dtype, d, model):
    if not rank0:
        return None
    handler = logging.FileHandler(os.path.join(cfg.out, "train.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    pkg = logging.getLogger("vmambax")
    handler.restore_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:  # the log file gets the epoch lines whatever the console shows
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    n_params = sum(p.numel() for p in unwrap(model).parameters())
    log.info("train: %d slices (%d skipped), val: %d slices from %s; crop %dx%d, global batch %d over %d "
             "process(es), %s, %d epochs, %.2f M parameters", len(train_ds), len(train_ds.skipped), len(val_ds),
             val_source, crop, crop, cfg.batch_size, d.world, "fp32" if dtype is None else str(dtype).split(".")[-1],
             cfg.epochs, n_params / 1e6)
    return handler


def _epoch_outputs(out: str, history: list[dict]):
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    from vmambax.engine.figures import training_curve
    training_curve(history, os.path.join(out, "training_curve.png"))
