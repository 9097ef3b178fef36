"""Checkpoints: atomic writes, weights_only loading, clear errors for wrong or broken files."""
import os

import pytest
import torch

from vmambax.engine import checkpoint as ck
from vmambax.utils.tiny import TinySegNet


def _ours(model, spec=None):
    return {"format": ck.FORMAT, "version": ck.VERSION, "model_spec": spec or {"name": "tiny", "kwargs": {}},
            "model": model.state_dict()}


def test_roundtrip_rebuilds_the_model(tmp_path):
    m = TinySegNet()
    ck.save_atomic(_ours(m), str(tmp_path / "a.pt"))
    m2, meta = ck.load_model(str(tmp_path / "a.pt"))
    assert not m2.training and meta["model_spec"]["name"] == "tiny"
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_a_kill_during_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "latest.pt")
    ck.save_atomic({"x": torch.ones(3)}, path)

    def torn_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # the process is killed half-way through writing

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_atomic({"x": torch.zeros(3)}, path)
    assert torch.equal(ck.load(path)["x"], torch.ones(3))
    assert os.listdir(tmp_path) == ["latest.pt"]


def test_checkpoint_of_another_model(tmp_path):
    ck.save_atomic(_ours(TinySegNet(width=4), {"name": "tiny", "kwargs": {"width": 4}}), str(tmp_path / "w4.pt"))
    state = _ours(TinySegNet(width=4))  # spec says width 8, weights are width 4
    ck.save_atomic(state, str(tmp_path / "bad.pt"))
    with pytest.raises(ck.CheckpointError, match="bad.pt holds a different model"):
        ck.load_model(str(tmp_path / "bad.pt"))
    other = torch.nn.Linear(3, 3)
    torch.save(_ours(other), tmp_path / "lin.pt")
    with pytest.raises(ck.CheckpointError, match="lin.pt holds a different model: .* missing keys"):
        ck.load_model(str(tmp_path / "lin.pt"))


def test_not_weights_corrupt_lfs_and_missing(tmp_path):
    (tmp_path / "lfs.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    with pytest.raises(ck.CheckpointError, match="lfs.pt is a Git LFS pointer"):
        ck.load(str(tmp_path / "lfs.pt"))
    (tmp_path / "stack.pt").write_bytes(b"Q" + bytes(299))  # BINPERSID on an empty stack: IndexError
    with pytest.raises(ck.CheckpointError, match="stack.pt cannot be read as a PyTorch checkpoint"):
        ck.load(str(tmp_path / "stack.pt"))
    (tmp_path / "junk.pt").write_bytes(os.urandom(300))
    with pytest.raises(ck.CheckpointError, match="junk.pt cannot be read as a PyTorch checkpoint"):
        ck.load(str(tmp_path / "junk.pt"))
    torch.save({"obj": TinySegNet}, tmp_path / "pickled.pt")  # arbitrary objects are refused
    with pytest.raises(ck.CheckpointError, match="pickled.pt cannot be read"):
        ck.load(str(tmp_path / "pickled.pt"))
    with pytest.raises(FileNotFoundError, match="none.pt does not exist"):
        ck.load(str(tmp_path / "none.pt"))


@pytest.mark.slow
def test_published_checkpoints_load_for_evaluation_and_init(tmp_path):
    models = pytest.importorskip("vmambax.models")
    torch.manual_seed(0)
    ref = models.VMambaX()
    sd = ref.state_dict()
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "lightning.ckpt")
    model, meta = ck.load_model(str(tmp_path / "lightning.ckpt"))
    assert meta == {} and all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    target = models.VMambaX()
    ck.init_weights(target, str(tmp_path / "lightning.ckpt"))
    assert all(torch.equal(sd[k], v) for k, v in target.state_dict().items())
    torch.save({"model": TinySegNet().state_dict()}, tmp_path / "other.pth")
    with pytest.raises(ck.CheckpointError, match="other.pth is neither a vmambax training checkpoint nor"):
        ck.load_model(str(tmp_path / "other.pth"))
