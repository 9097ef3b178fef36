"""load_vmamba_backbone: VMamba-T v0 classification checkpoints (old key names) into the shared
encoder; used/skipped/missing reported; files that are not checkpoints refused."""
import logging
import re

import pytest
import torch

from vmambax.models import VMambaX, load_vmamba_backbone
from vmambax.models.encoder import VSSEncoder

SMALL = dict(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), decoder_depth=1)


def _to_v0_name(key: str) -> str:
    """Our (and VMamba's current) encoder key -> the v0 checkpoint's name for it."""
    key = key.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
    return re.sub(r"(\.blocks\.\d+)\.norm\.", r"\1.ln_1.", key).replace(".op.", ".self_attention.")


@pytest.fixture()
def v0_checkpoint(tmp_path):
    """A v0-style {"model": sd}: every encoder tensor except the outnorms (the classification model
    has none), plus the classifier and one tensor of the wrong shape."""
    torch.manual_seed(5)
    with torch.device("meta"):
        keys = VSSEncoder(3, SMALL["depths"], SMALL["dims"]).state_dict()
    sd = {_to_v0_name(k): torch.randn(v.shape) for k, v in keys.items() if not k.startswith("outnorm")}
    sd["norm.weight"], sd["norm.bias"] = torch.ones(256), torch.zeros(256)
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, 256), torch.zeros(1000)
    sd["layers.0.blocks.0.self_attention.A_logs"] = torch.randn(3, 3)
    path = tmp_path / "vssmtiny_dp01_ckpt_epoch_292.pth"
    torch.save({"model": sd, "epoch": 292}, path)
    return path, sd


def test_loads_v0_names_into_the_shared_encoder(v0_checkpoint, caplog):
    path, sd = v0_checkpoint
    model = VMambaX(**SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="vmambax.models.vmambax"):
        report = load_vmamba_backbone(model, path)
    enc = model.backbone.vssm.state_dict()
    assert "layers.0.blocks.0.ln_1.weight" in report.used
    assert torch.equal(enc["layers.0.blocks.0.norm.weight"], sd["layers.0.blocks.0.ln_1.weight"])
    assert torch.equal(enc["patch_embed.0.weight"], sd["patch_embed.proj.weight"])
    assert torch.equal(enc["layers.3.blocks.0.op.x_proj_weight"], sd["layers.3.blocks.0.self_attention.x_proj_weight"])
    assert torch.equal(enc["layers.2.downsample.reduction.weight"], sd["layers.2.downsample.reduction.weight"])
    assert set(report.skipped) == {"norm.weight", "norm.bias", "head.weight", "head.bias",
                                   "layers.0.blocks.0.self_attention.A_logs"}
    assert "shape (3, 3)" in report.skipped["layers.0.blocks.0.self_attention.A_logs"]
    assert len(report.used) == len(sd) - 5
    assert report.missing == sorted(["layers.0.blocks.0.op.A_logs"] +
                                    [f"outnorm{i}.{p}" for i in range(4) for p in ("weight", "bias")])
    # the rest of the model is untouched, the missing tensors kept
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("backbone.vssm."))
    assert torch.equal(after["backbone.vssm.outnorm0.weight"], before["backbone.vssm.outnorm0.weight"])
    assert "5 skipped" in caplog.text and "tensors used" in caplog.text


def test_encoder_alone_and_current_names(v0_checkpoint, tmp_path):
    _, sd = v0_checkpoint
    renamed = {k.replace("self_attention", "op").replace("ln_1", "norm").replace("patch_embed.proj", "patch_embed.0")
                .replace("patch_embed.norm", "patch_embed.2"): v for k, v in sd.items()}
    path = tmp_path / "current_names.pth"
    torch.save(renamed, path)  # a bare state dict with today's names works too
    enc = VSSEncoder(3, SMALL["depths"], SMALL["dims"])
    report = load_vmamba_backbone(enc, path)
    assert len(report.used) == len(sd) - 5


def test_refuses_files_that_are_not_checkpoints(tmp_path):
    model = VMambaX(**SMALL)
    lfs = tmp_path / "vssmtiny_dp01_ckpt_epoch_292.pth"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 363323452\n")
    with pytest.raises(ValueError, match="Git LFS pointer"):
        load_vmamba_backbone(model, lfs)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="junk.pth cannot be read as a PyTorch checkpoint"):
        load_vmamba_backbone(model, junk)
    other = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(ValueError, match="holds no tensor of the VMamba-T encoder"):
        load_vmamba_backbone(model, other)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="expected a checkpoint dict"):
        load_vmamba_backbone(model, listed)
    with pytest.raises(TypeError, match="model: expected a VMambaX or a VSSEncoder"):
        load_vmamba_backbone(torch.nn.Linear(2, 2), other)
