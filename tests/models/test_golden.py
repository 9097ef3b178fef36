"""vMambaX equals the published implementation: its weights (rebuilt by the fixture rule into the
published key layout) loaded strictly through every checkpoint container, then every intermediate
the fixture recorded compared at 128x128 (eval, fp32).

Tolerance: relative max error <= 1e-4 (the lead's bound for a whole network). Measured: <= 3.4e-6 on
every intermediate, 1.4e-6 on the logits (float32 summation-order differences only).
"""
import pytest
import torch

from vmambax.models import VMambaX, checkpoint_filter_fn, from_reference_checkpoint

REL_TOL = 1e-4


def _rel(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module")
def loaded(published_state_dict):
    return from_reference_checkpoint(published_state_dict)


def test_published_key_layout_is_ours(published_state_dict):
    with torch.device("meta"):
        own = VMambaX().state_dict()
    assert list(own) == list(published_state_dict)  # same keys, same order
    assert all(own[k].shape == v.shape for k, v in published_state_dict.items())


def test_outputs_equal_published(loaded, golden):
    ct, pet = golden["inputs_ct_pet"]
    caught = {}
    hooks = [loaded.backbone.vssm.register_forward_hook(lambda m, i, o: caught.__setitem__("enc", o)),
             loaded.backbone.register_forward_hook(lambda m, i, o: caught.__setitem__("fused", o))]
    for i, cgm in enumerate(loaded.backbone.modal_fusion):
        hooks.append(cgm.register_forward_hook(lambda m, inp, o, i=i: caught.__setitem__(f"cgm{i}", o)))
    try:
        with torch.no_grad():
            logits = loaded(ct, pet)
    finally:
        for h in hooks:
            h.remove()
    errors = {"logits": _rel(logits, golden["logits"])}
    for i in range(4):
        enc = caught["enc"][i]  # the shared encoder ran once on [ct; pet]
        errors[f"encoder_ct{i}"] = _rel(enc[:1], golden["encoder_ct"][i])
        errors[f"encoder_pet{i}"] = _rel(enc[1:], golden["encoder_pet"][i])
        for j, m in enumerate(("ct", "pet")):
            errors[f"cgm{i}_{m}"] = _rel(caught[f"cgm{i}"][j], golden[f"cgm{i}_out_ct_pet"][j])
        errors[f"fused{i}"] = _rel(caught["fused"][i], golden["fused"][i])
    bad = {k: v for k, v in errors.items() if not v <= REL_TOL}
    assert not bad, f"relative errors above {REL_TOL}: {bad} (all: {errors})"


@pytest.mark.parametrize("container", ["model", "lightning"])
def test_containers_load_the_same_weights(published_state_dict, loaded, container, tmp_path):
    sd = published_state_dict
    obj = {"model": sd} if container == "model" else {
        "state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3, "global_step": 10}
    path = tmp_path / ("ckpt.pth" if container == "model" else "last.ckpt")
    torch.save(obj, path)
    for source in (obj, path):
        model = from_reference_checkpoint(source)
        assert not model.training
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_filter_fn_is_pure(published_state_dict):
    obj = {"state_dict": {f"model.{k}": v for k, v in published_state_dict.items()}}
    assert list(checkpoint_filter_fn(obj)) == list(published_state_dict)
    assert all(k.startswith("model.") for k in obj["state_dict"])  # input untouched


def test_strict_loading_names_the_keys(published_state_dict):
    sd = dict(published_state_dict)
    sd.pop("decode_head.up.norm.bias")
    sd["backbone.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing 1: \[decode_head.up.norm.bias\]; "
                                         r"unexpected 1: \[backbone.extra.weight\]"):
        from_reference_checkpoint(sd)
    sd = dict(published_state_dict)
    sd["backbone.vssm.outnorm0.weight"] = torch.ones(5)
    with pytest.raises(ValueError, match=r"backbone.vssm.outnorm0.weight \(5,\) \(expected \(96,\)\)"):
        from_reference_checkpoint(sd)
    with pytest.raises(ValueError, match="checkpoint: expected a state dict"):
        from_reference_checkpoint({"optimizer": {"lr": 1}, "epoch": 3})


def test_checkpoint_file_errors(tmp_path):
    lfs = tmp_path / "model.pth"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ValueError, match="Git LFS pointer"):
        from_reference_checkpoint(lfs)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="junk.pth cannot be read as a PyTorch checkpoint"):
        from_reference_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="absent.pth does not exist"):
        from_reference_checkpoint(tmp_path / "absent.pth")
