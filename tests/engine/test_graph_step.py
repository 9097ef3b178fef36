"""``vmambax train --cuda-graph``: what it refuses and the optimizer state it keeps (CPU), and on a
GPU that a replayed step trains as the eager one and resumes exactly."""
import csv

import pytest
import torch

from vmambax.engine.checkpoint import load
from vmambax.engine.graph_step import check_graph_step, make_capturable, portable_state
from vmambax.engine.train import TrainConfig, train

TINY = {"name": "tiny", "kwargs": {}}


def _cfg(data, out, **kw):
    # tiny_data has 8 training slices: 4 steps an epoch at batch 2.
    base = dict(epochs=2, batch_size=2, size=64, lr=1e-3, workers=0, progress=False, deterministic=True,
                model=TINY)
    return TrainConfig(data=data, out=str(out), **{**base, **kw})


def _losses(run):
    return [float(r["loss"]) for r in csv.DictReader(open(run / "steps.csv"))]


@pytest.mark.parametrize("device, dtype, world, match", [
    ("cpu", None, 1, "needs a CUDA device, got cpu"),
    ("cuda", torch.bfloat16, 2, "runs in one process, got 2"),
    ("cuda", torch.float16, 1, "GradScaler syncs with the host"),
])
def test_what_the_graph_step_refuses(device, dtype, world, match):
    with pytest.raises(ValueError, match=match):
        check_graph_step(torch.device(device), dtype, world)


def test_graph_step_needs_a_gpu_and_says_so_before_training(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="cuda_graph: needs a CUDA device"):
        train(_cfg(tiny_data, tmp_path / "run", cuda_graph=True, device="cpu"))
    assert not (tmp_path / "run" / "checkpoint_latest.pt").exists()


def test_capturable_learning_rate_follows_the_schedule_and_checkpoints_as_a_number():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    make_capturable(opt)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and opt.param_groups[0]["capturable"]
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] is lr          # filled in place: a captured step reads this tensor
    assert lr.item() == pytest.approx(5e-4)
    state = portable_state(opt)
    assert state["param_groups"][0]["lr"] == pytest.approx(5e-4) and not isinstance(state["param_groups"][0]["lr"],
                                                                                    torch.Tensor)
    assert state["param_groups"][0]["capturable"] is False
    assert opt.param_groups[0]["lr"] is lr and opt.param_groups[0]["capturable"]  # the optimizer is unchanged
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1.0)
    fresh.load_state_dict(state)                    # an eager resume: a number, not capturable
    assert fresh.param_groups[0]["lr"] == pytest.approx(5e-4) and not fresh.param_groups[0]["capturable"]


@pytest.mark.gpu
def test_graph_step_trains_as_the_eager_step(tiny_data, tmp_path):
    """Tiny model (BatchNorm, dropout), fp32, deterministic: 3 eager warm-up steps, the capture, then
    replays across an epoch boundary (the generator re-seeded). Only AdamW's scalars differ (device
    tensors instead of host numbers): same bound as the compile flag's test, losses written with 6
    decimals."""
    eager = train(_cfg(tiny_data, tmp_path / "eager", device="cuda", amp="off"))
    graph = train(_cfg(tiny_data, tmp_path / "graph", device="cuda", amp="off", cuda_graph=True))
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "graph")
    assert len(a) == len(b) == 8
    assert b[0] == a[0]                             # the first loss precedes every optimizer step
    assert b == pytest.approx(a, rel=1e-4, abs=2e-6)
    assert graph["history"][-1]["val_dice"] == pytest.approx(eager["history"][-1]["val_dice"], abs=1e-4)
    ka = load(str(tmp_path / "eager" / "checkpoint_final.pt"))
    kb = load(str(tmp_path / "graph" / "checkpoint_final.pt"))
    assert not isinstance(kb["optimizer"]["param_groups"][0]["lr"], torch.Tensor)
    for k in ka["model"]:
        assert torch.allclose(ka["model"][k].float(), kb["model"][k].float(), rtol=1e-3, atol=1e-5), k


@pytest.mark.gpu
def test_a_failed_capture_goes_on_eagerly(tiny_data, tmp_path, monkeypatch, caplog):
    """A forward that syncs with the host while it is captured (as an op with a data-dependent shape
    does): the capture fails midway, the warning says why, and the run trains on eagerly with the
    same losses; the dropout after the failure draws from a generator torch left in capture mode,
    so this also checks that the step gives it back."""
    from vmambax.utils.tiny import TinySegNet
    eager = train(_cfg(tiny_data, tmp_path / "eager", device="cuda", amp="off"))
    forward = TinySegNet.forward

    def syncs_when_captured(self, ct, pet):
        if torch.cuda.is_current_stream_capturing():
            ct.sum().item()
        return forward(self, ct, pet)

    monkeypatch.setattr(TinySegNet, "forward", syncs_when_captured)
    with caplog.at_level("WARNING", logger="vmambax"):
        graph = train(_cfg(tiny_data, tmp_path / "graph", device="cuda", amp="off", cuda_graph=True))
    assert "capturing the training step failed (" in caplog.text and "goes on eagerly" in caplog.text
    assert _losses(tmp_path / "graph") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-4, abs=2e-6)
    assert len(graph["history"]) == len(eager["history"]) == 2


@pytest.mark.gpu
def test_graph_step_captures_beside_loader_workers(tiny_data, tmp_path):
    """Loader workers and their pin-memory thread run beside the capture (a user's run at 512 lost
    its capture to them before the capture became thread-local)."""
    train(_cfg(tiny_data, tmp_path / "run", device="cuda", amp="off", cuda_graph=True, workers=2))
    log = open(tmp_path / "run" / "train.log").read()
    assert "captured after 3 eager steps" in log and "failed" not in log


@pytest.mark.gpu
def test_graph_step_resumes_exactly(tiny_data, tmp_path, request):
    """A graph run cut after epoch 1 and resumed (its epoch 2 warms up eagerly and captures anew)
    equals the uninterrupted graph run, whose epoch 2 only replays: an eager step and a replay run
    the same kernels on the same generator offsets."""
    cfg = dict(device="cuda", amp="off", cuda_graph=True, epochs=3)
    train(_cfg(tiny_data, tmp_path / "full", **cfg))
    restore = request.getfixturevalue("cut_in_epoch_2")
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_data, tmp_path / "cut", **cfg))
    restore()
    train(_cfg(tiny_data, tmp_path / "cut", resume=True, **cfg))
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
    a = load(str(tmp_path / "full" / "checkpoint_final.pt"))["model"]
    b = load(str(tmp_path / "cut" / "checkpoint_final.pt"))["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.gpu
def test_graph_step_trains_the_model_in_bf16(tmp_path):
    """vMambaX at 128x128, bf16, the scan on the GPU: the step replays, the losses stay finite."""
    from vmambax.data import make_synthetic_dataset
    data = str(tmp_path / "data")
    make_synthetic_dataset(data, patients=4, size=128, slices=4, seed=0)
    # 8 training slices, 4 steps an epoch: epoch 1 warms up (3) and captures, epoch 2 only replays.
    r = train(TrainConfig(data=data, out=str(tmp_path / "run"), epochs=2, batch_size=2, size=128, workers=0,
                          progress=False, device="cuda", amp="bf16", cuda_graph=True))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    log = open(tmp_path / "run" / "train.log").read()
    assert "captured after 3 eager steps" in log
    # Epoch 2 only replays: its peak must still count the memory the graph holds (the allocator
    # no longer sees it; at 512 the figure read 1.8 GB against epoch 1's 16.2 GB before).
    peaks = [h["peak_mem_gb"] for h in r["history"]]
    assert peaks[0] > 0 and peaks[1] >= 0.95 * peaks[0], peaks
