"""The main job on its embedded default: synthetic PET-CT, brief training of the full model,
evaluation, figures and a summary, in minutes on a laptop CPU."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass

from vmambax.data import make_synthetic_dataset
from vmambax.engine.common import pick_device
from vmambax.engine.evaluate import evaluate, table_line
from vmambax.engine.train import TrainConfig, train

log = logging.getLogger(__name__)
MARKER = ".vmambax-demo"  # a demo folder may be replaced by the next demo; anything else is kept


# Sizes per device, measured on the 2-core CI CPU (the full model, its scans through the PyTorch
# reference). At 128x128 a training step of batch 4 took 19 s on an idle machine but 180 s beside
# one other test job (two processes' threads fighting over two cores), so 128x128 cannot promise
# 10 minutes. At 64x64 a step of batch 2 took 0.65 s idle (4.8 s busy); 63 steps (lr 5e-4) gave
# test Dice 0.31 in 60 s. A GPU trains at 128x128.
_AUTO = {"cpu": dict(patients=10, slices=6, size=64, epochs=3, batch_size=2, steps_per_epoch=None),
         "cuda": dict(patients=12, slices=8, size=128, epochs=8, batch_size=8, steps_per_epoch=None)}


@dataclass
class DemoConfig:
    """``None`` fields take the device's default from ``_AUTO``."""
    out: str = "vmambax_demo"
    patients: int | None = None
    slices: int | None = None
    size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 5e-4           # above the paper's 6e-5: a few steps must show learning
    steps_per_epoch: int | None = None
    seed: int = 0
    device: str | None = None
    progress: bool = True
    model: dict | None = None  # None: the full default VMambaX


def run_demo(cfg: DemoConfig) -> dict:
    """Returns ``{"data", "run", "eval", "summary", "seconds"}`` (paths, the evaluation summary)."""
    t0 = time.perf_counter()
    auto = _AUTO["cuda" if pick_device(cfg.device).type == "cuda" else "cpu"]
    cfg = dataclasses.replace(cfg, **{k: v for k, v in auto.items() if getattr(cfg, k) is None})
    if os.path.isdir(cfg.out) and os.listdir(cfg.out):
        if not os.path.exists(os.path.join(cfg.out, MARKER)):
            raise ValueError(f"out: {cfg.out} exists and is not a demo folder; choose another (nothing was changed)")
        shutil.rmtree(cfg.out)
    os.makedirs(cfg.out)
    open(os.path.join(cfg.out, MARKER), "w").close()
    data, run, ev = (os.path.join(cfg.out, d) for d in ("data", "run", "eval"))
    desc = make_synthetic_dataset(data, patients=cfg.patients, size=cfg.size, slices=cfg.slices, seed=cfg.seed)
    tc = TrainConfig(data=data, out=run, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, size=cfg.size,
                     seed=cfg.seed, workers=0, steps_per_epoch=cfg.steps_per_epoch, device=cfg.device,
                     progress=cfg.progress)
    if cfg.model is not None:
        tc.model = cfg.model
    result = train(tc)
    summary = evaluate(data, os.path.join(run, "checkpoint_best.pt"), ev, split="test", device=cfg.device)
    secs = time.perf_counter() - t0
    return {"data": data, "run": run, "eval": ev, "dataset": desc, "train": result, "summary": summary,
            "seconds": secs, "table": table_line("vMambaX (demo)", summary), "config": cfg}
