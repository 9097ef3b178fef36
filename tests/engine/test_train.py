"""Training on the tiny test model: outputs, exact resume after an interruption, user errors."""
import csv
import os

import pytest
import torch

from vmambax.engine.checkpoint import load
from vmambax.engine.train import TrainConfig, train

TINY = {"name": "tiny", "kwargs": {}}


def _cfg(data, out, **kw):
    base = dict(epochs=3, batch_size=2, size=64, lr=1e-3, workers=0, progress=False, deterministic=True,
                steps_per_epoch=3, model=TINY)
    return TrainConfig(data=data, out=str(out), **{**base, **kw})


def test_outputs(tiny_data, tmp_path):
    r = train(_cfg(tiny_data, tmp_path / "run", epochs=2))
    for f in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt", "train.log", "metrics.csv",
              "steps.csv", "training_curve.png", "config.json"):
        assert os.path.getsize(tmp_path / "run" / f) > 0, f
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(0 <= float(r["val_dice"]) <= 1 for r in rows)
    assert len(list(csv.DictReader(open(tmp_path / "run" / "steps.csv")))) == 6
    log = open(tmp_path / "run" / "train.log").read()
    assert "epoch 1/2" in log and "val_dice" in log and "derived" not in log  # synth writes val.txt
    ck = load(str(tmp_path / "run" / "checkpoint_final.pt"))
    assert ck["epoch"] == 2 and ck["model_spec"] == TINY and r["best"]["epoch"] in (1, 2)
    # cosine: the lr recorded at epoch 2 is below the first
    assert float(rows[1]["lr"]) < float(rows[0]["lr"]) == pytest.approx(1e-3)


def test_resume_after_interruption_equals_uninterrupted(tiny_data, tmp_path, request):
    full = train(_cfg(tiny_data, tmp_path / "full"))
    restore = request.getfixturevalue("cut_in_epoch_2")   # after the full run: it validates normally
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_data, tmp_path / "cut"))
    assert load(str(tmp_path / "cut" / "checkpoint_latest.pt"))["epoch"] == 1
    restore()
    resumed = train(_cfg(tiny_data, tmp_path / "cut", resume=True, epochs=99))  # the run's own epochs win
    a = load(str(tmp_path / "full" / "checkpoint_final.pt"))
    b = load(str(tmp_path / "cut" / "checkpoint_final.pt"))
    assert b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in resumed["history"]]
    steps = lambda run: open(tmp_path / run / "steps.csv").read()  # noqa: E731
    assert steps("cut") == steps("full")  # the cut epoch's steps are not listed twice


def test_a_non_finite_loss_stops_the_run_before_its_checkpoint(tiny_data, tmp_path, monkeypatch):
    """The fifth training step's loss turns NaN (epoch 2, step 1): the run stops with an error that
    names the step, and the checkpoints keep epoch 1."""
    from vmambax.engine import train as train_mod
    real, calls = train_mod.seg_loss, {"n": 0}

    def nan_in_the_fifth_step(logits, mask):
        loss = real(logits, mask)
        if torch.is_grad_enabled():            # training steps only, not validation
            calls["n"] += 1
            if calls["n"] == 5:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_mod, "seg_loss", nan_in_the_fifth_step)
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 1: the loss is nan"):
        train(_cfg(tiny_data, tmp_path / "run"))
    assert load(str(tmp_path / "run" / "checkpoint_latest.pt"))["epoch"] == 1


def test_existing_run_is_not_overwritten_and_resume_needs_a_run(tiny_data, tmp_path):
    train(_cfg(tiny_data, tmp_path / "run", epochs=1, steps_per_epoch=1))
    before = os.path.getmtime(tmp_path / "run" / "checkpoint_latest.pt")
    with pytest.raises(ValueError, match="already holds a run"):
        train(_cfg(tiny_data, tmp_path / "run", epochs=1))
    assert os.path.getmtime(tmp_path / "run" / "checkpoint_latest.pt") == before
    with pytest.raises(FileNotFoundError, match="no .*checkpoint_latest.pt to resume from"):
        train(_cfg(tiny_data, tmp_path / "other", resume=True))


@pytest.mark.parametrize("kw, exc, match", [
    (dict(batch_size=1), ValueError, "BatchNorm .* at least 2 samples per device"),
    (dict(size=48), ValueError, "size: expected a multiple of 32"),
    (dict(amp="fp8"), ValueError, "amp: expected one of"),
    (dict(resume=True, init_checkpoint="x.pt"), ValueError, "cannot be combined"),
    (dict(batch_size=64), ValueError, "fewer than one batch of 64"),
])
def test_bad_config(tiny_data, tmp_path, kw, exc, match):
    with pytest.raises(exc, match=match):
        train(_cfg(tiny_data, tmp_path / "run", **kw))


def test_unwritable_output_folder(tiny_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="out: cannot write to the output folder"):
        train(_cfg(tiny_data, blocker / "run"))


def test_deterministic_run_leaves_the_process_switches_as_they_were(tiny_data, tmp_path):
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    train(_cfg(tiny_data, tmp_path / "run", epochs=1, steps_per_epoch=1, deterministic=True))
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    with pytest.raises(ValueError):   # and on the way out of a failed run
        train(_cfg(tiny_data, tmp_path / "bad", size=48, deterministic=True))
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


def test_output_folder_checked_by_many_processes_at_once(tmp_path):
    """torchrun's processes all check the run folder at the same moment (a shared probe file once
    made one of two ranks fail in CI: the other had removed it)."""
    from concurrent.futures import ThreadPoolExecutor
    from vmambax.engine.common import check_writable
    folder = str(tmp_path / "run")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: check_writable(folder), range(400)))   # raises if any call failed
    assert os.listdir(folder) == []   # no probe left behind


def test_validation_derived_per_patient_without_val_txt(tiny_data, tmp_path):
    import shutil
    data = shutil.copytree(tiny_data, tmp_path / "d")
    os.remove(data / "val.txt")
    train(_cfg(str(data), tmp_path / "run", epochs=1, steps_per_epoch=1, val_fraction=0.5))
    assert "derived per patient from train.txt" in open(tmp_path / "run" / "train.log").read()


def test_init_checkpoint_starts_from_those_weights(tiny_data, tmp_path):
    train(_cfg(tiny_data, tmp_path / "a", epochs=1, steps_per_epoch=1))
    src = str(tmp_path / "a" / "checkpoint_final.pt")
    r = train(_cfg(tiny_data, tmp_path / "b", epochs=1, steps_per_epoch=1, lr=1e-12, init_checkpoint=src))
    a, b = load(src)["model"], load(str(tmp_path / "b" / "checkpoint_final.pt"))["model"]
    # lr 1e-12: one AdamW step moves each weight by about 1e-12, so b holds a's weights (BatchNorm's
    # running statistics do move with the step, so only the learned weights are compared)
    learned = [k for k in a if "running" not in k and "num_batches" not in k]
    assert len(learned) > 4 and r["history"]
    assert all(torch.allclose(a[k], b[k], atol=1e-9) for k in learned)


def test_backbone_weights_start_the_shared_encoder(tiny_data, tmp_path):
    # --backbone wiring: the file's encoder tensors (VMamba's current names here; the v0 renames are
    # tested with the model) are in the encoder when training starts.
    from vmambax.models.encoder import VSSEncoder
    small = {"depths": [1, 1, 1, 1], "dims": [32, 64, 128, 256], "decoder_depth": 1}
    torch.manual_seed(3)
    enc = VSSEncoder(3, small["depths"], small["dims"]).state_dict()
    sd = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in enc.items()
          if not k.startswith("outnorm")}
    path = tmp_path / "backbone.pth"
    torch.save({"model": sd}, path)
    train(_cfg(tiny_data, tmp_path / "run", epochs=1, steps_per_epoch=1, lr=1e-12, backbone=str(path),
               model={"name": "VMambaX", "kwargs": {"num_classes": 1, **small}}))
    got = load(str(tmp_path / "run" / "checkpoint_final.pt"))["model"]
    learned = [k for k in sd if "running" not in k and "num_batches" not in k]
    assert len(learned) > 20
    assert all(torch.allclose(got[f"backbone.vssm.{k}"], sd[k], atol=1e-9) for k in learned)
    assert "backbone" in open(tmp_path / "run" / "train.log").read()


def test_compile_flag_trains_the_same_and_keeps_checkpoint_keys(tiny_data, tmp_path):
    plain = train(_cfg(tiny_data, tmp_path / "plain", epochs=1, steps_per_epoch=2))
    compiled = train(_cfg(tiny_data, tmp_path / "compiled", epochs=1, steps_per_epoch=2, compile=True))
    a = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "plain" / "steps.csv"))]
    b = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "compiled" / "steps.csv"))]
    # Inductor reorders fp32 sums; the losses are written with 6 decimals
    assert b == pytest.approx(a, rel=1e-4, abs=2e-6)
    assert compiled["history"][0]["val_dice"] == pytest.approx(plain["history"][0]["val_dice"], abs=1e-6)
    ka = load(str(tmp_path / "plain" / "checkpoint_final.pt"))["model"].keys()
    kb = load(str(tmp_path / "compiled" / "checkpoint_final.pt"))["model"].keys()
    assert list(kb) == list(ka)  # nn.Module.compile keeps the state dict's keys (no "_orig_mod.")
