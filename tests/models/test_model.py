"""VMambaX as a module: size, shapes (square, non-square, 1 or 3 channels), DCIM on non-square maps,
user errors, training rules, backend pass-through, FLOPs. A small configuration keeps CPU runs short;
the published size is checked on the meta device."""
import pytest
import torch

from vmambax.models import VMambaX, count_flops
from vmambax.models.fusion import WINDOW, RegionBlock, RegionStem, dcim
from vmambax_kernels.modules import SS2D, LayerNorm
from vmambax_kernels.testing import assert_close_by_rule

SMALL = dict(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), decoder_depth=1)


def small(**kw):
    torch.manual_seed(0)
    return VMambaX(**{**SMALL, **kw})


def test_published_size():
    with torch.device("meta"):
        m = VMambaX()
    assert sum(p.numel() for p in m.parameters()) == 53_403_682  # paper, Table 1: 53.4 M
    assert sum(1 for _ in m.parameters()) == 756 and sum(1 for _ in m.buffers()) == 96


def test_layer_norm_sites():
    """The LayerNorms that write the autocast dtype (vmambax_kernels' LayerNorm) are exactly those
    whose every consumer casts to it anyway; the others stay nn.LayerNorm (fp32 under autocast)."""
    with torch.device("meta"):
        m = VMambaX()
    kinds = {n: type(x) for n, x in m.named_modules() if isinstance(x, torch.nn.LayerNorm)}
    ours = {n for n, k in kinds.items() if k is LayerNorm}
    plain = {n for n, k in kinds.items() if k is torch.nn.LayerNorm}
    assert len(ours) == 15 + 3 + 2 * 4 + 2 * 12 + 2 and len(plain) == 35 + 4 + 1 + 3
    assert {n.split(".")[-1] for n in ours} == {"norm", "inner_norm1", "outer_norm1", "norm1", "norm2", "norm_up"}
    assert all(n.endswith(("out_norm", "patch_embed.2")) or ".outnorm" in n or n.startswith("decode_head.layers_up")
               for n in plain)
    assert not any(n.endswith("out_norm") for n in ours)   # SS2D's: norm_gate fuses it


@pytest.mark.parametrize("size", [(32, 32), (96, 160)])
def test_shapes_and_one_channel(size):
    m = small(num_classes=2).eval()
    g = torch.Generator().manual_seed(1)
    ct, pet = torch.randn(2, 1, *size, generator=g), torch.randn(2, 1, *size, generator=g)
    with torch.no_grad():
        out1 = m(ct, pet)
        assert out1.shape == (2, 2, *size)
        assert torch.isfinite(out1).all()
        if size == (32, 32):  # 1 channel is the 3-channel input repeated
            assert torch.equal(out1, m(ct.repeat(1, 3, 1, 1), pet.repeat(1, 3, 1, 1)))


def _dcim_window_loop(stem, block, x_ct, x_pet):
    """DCIM the slow obvious way: pad, then every 4x4 window through the inner SS2D on its own."""
    H, W = x_ct.shape[-2:]
    pad = (0, -W % WINDOW, 0, -H % WINDOW)
    x_ct, x_pet = torch.nn.functional.pad(x_ct, pad), torch.nn.functional.pad(x_pet, pad)
    inner = stem.inner_convs(x_ct)                                   # (Bt, C, Hp, Wp)
    outer = stem.outer_convs(x_pet).permute(0, 2, 3, 1)              # (Bt, Hg, Wg, C)
    outer = outer + block.outer_attn(block.outer_norm1(outer))
    out = torch.zeros_like(inner)
    for i in range(outer.shape[1]):
        for j in range(outer.shape[2]):
            rows, cols = slice(WINDOW * i, WINDOW * (i + 1)), slice(WINDOW * j, WINDOW * (j + 1))
            win = inner[:, :, rows, cols].permute(0, 2, 3, 1)        # (Bt, 4, 4, C)
            normed = block.inner_norm1(win.flatten(1)).view_as(win)
            y = win + block.inner_attn(normed) + outer[:, i, j, None, None, :]
            out[:, :, rows, cols] = y.permute(0, 3, 1, 2)
    return out[..., :H, :W]


@pytest.mark.parametrize("H,W", [(6, 10), (8, 4), (3, 5)])
def test_dcim_windows_on_non_square_maps(H, W):
    torch.manual_seed(0)
    stem, block = RegionStem(16).eval(), RegionBlock(16, d_state=4).eval()
    g = torch.Generator().manual_seed(2)
    x_ct, x_pet = torch.randn(2, 16, H, W, generator=g), torch.randn(2, 16, H, W, generator=g)
    with torch.no_grad():
        out = dcim(stem, block, x_ct, x_pet)
        ref = {dt: _dcim_window_loop(stem.to(dt), block.to(dt), x_ct.to(dt), x_pet.to(dt))
               for dt in (torch.float64, torch.float32)}
    assert out.shape == (2, 16, H, W)
    assert_close_by_rule("dcim", out, ref[torch.float64], ref[torch.float32])


def test_training_step_small_batch2():
    m = small().train()
    g = torch.Generator().manual_seed(3)  # 32x64: DCIM pads its two deepest maps, backward included
    ct, pet = torch.randn(2, 3, 32, 64, generator=g), torch.randn(2, 3, 32, 64, generator=g)
    m(ct, pet).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no or non-finite gradient: {missing[:5]}"


def test_training_needs_two_samples():
    m = small().train()
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match="at least 2 samples per device.*got batch size 1"):
        m(x, x)
    with torch.no_grad():
        assert m.eval()(x, x).shape == (1, 1, 32, 32)  # inference with one sample is fine


@pytest.mark.parametrize("ct,pet,err,msg", [
    (torch.randn(1, 2, 64, 64), torch.randn(1, 1, 64, 64), ValueError, r"ct: expected shape \(Bt, 1 or 3, H, W\)"),
    (torch.randn(1, 1, 64, 48), torch.randn(1, 1, 64, 48), ValueError, "multiples of 32, got 64x48"),
    (torch.randn(1, 1, 64, 64), torch.randn(2, 1, 64, 64), ValueError, "pet: expected the batch size and size of ct"),
    (torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 96), ValueError, "pet: expected the batch size and size of ct"),
    (torch.zeros(1, 1, 64, 64, dtype=torch.long), torch.randn(1, 1, 64, 64), TypeError, "ct: expected a floating-point"),
    (torch.randn(64, 64), torch.randn(1, 1, 64, 64), ValueError, "ct: expected shape"),
    ("ct.png", torch.randn(1, 1, 64, 64), TypeError, "ct: expected a torch.Tensor, got str"),
    (torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64, dtype=torch.float64), TypeError, "pet: expected dtype"),
])
def test_bad_inputs(ct, pet, err, msg):
    with pytest.raises(err, match=msg):
        small().eval()(ct, pet)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes: expected a positive int, got 0"):
        VMambaX(num_classes=0, **SMALL)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        VMambaX(use_cgn=True)


def test_backend_reaches_every_fused_op():
    m = small(backend="reference")
    fused = [mod for mod in m.modules() if isinstance(mod, SS2D) or hasattr(mod, "spatial_gate_rgb")]
    assert len(fused) == 4 + 2 * 4 + 4 + 3 and all(f.backend == "reference" for f in fused)
    m.set_backend("cuda")  # no CUDA C++ CGM kernel: CGM goes automatic (Triton on GPUs)
    assert {f.backend for f in fused} == {"cuda", None}
    assert m.set_backend("triton", cgm_backend="reference").backbone.modal_fusion[0].backend == "reference"
    m.set_backend("cuda").eval()  # CPU tensors: the scan refuses, naming the backend and why
    with pytest.raises(RuntimeError, match="cuda"):
        with torch.no_grad():
            m(torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64))


def test_reference_backend_keeps_the_upsampling_spec(monkeypatch):
    """The decoder's upsamplings follow the model's backend: "reference" keeps PyTorch's backward
    even where the gathering one would run (CUDA with Triton, faked here)."""
    from vmambax.models import decoder
    from vmambax.models.decoder import FinalUpsampleX4, UpsampleExpand
    seen = []
    monkeypatch.setattr(decoder, "fused_up2", lambda device_type: True)
    monkeypatch.setattr(decoder, "up2_bilinear", lambda x, backend: seen.append(backend) or x)
    m = small(backend="reference")
    ups = [mod for mod in m.modules() if isinstance(mod, (UpsampleExpand, FinalUpsampleX4))]
    assert len(ups) == 3 and all(u.backend == "reference" for u in ups)
    ups[0](torch.randn(1, 4, 4, ups[0].linear.in_features))
    m.set_backend("triton")
    assert all(u.backend == "triton" for u in ups)
    ups[0](torch.randn(1, 4, 4, ups[0].linear.in_features))
    assert seen == ["reference", "triton"]


def test_fusion_switches():
    g = torch.Generator().manual_seed(4)
    ct, pet = torch.randn(1, 1, 32, 32, generator=g), torch.randn(1, 1, 32, 32, generator=g)
    full = small().eval()
    outs = {}
    for cgm in (True, False):
        for dc in (True, False):
            m = small(use_cgm=cgm, use_dcim=dc).eval()
            m.load_state_dict(full.state_dict())  # every variant keeps every module (published layout)
            with torch.no_grad():
                outs[cgm, dc] = m(ct, pet)
    assert len({o.sum().item() for o in outs.values()}) == 4


def test_flops_at_512_match_published():
    """Published (fvcore, DESIGN.md): 100.6 G in all, 26.96 G scans; encoder 58.8, DCIM 12.2,
    decoder 29.5, CGM 0.12. Ours omits norms/pooling/upsampling (count_flops docstring): measured
    99.69 G (-0.9%), scans 26.964 G exactly the same formula."""
    with torch.device("meta"):
        m = VMambaX()
    f = count_flops(m, (512, 512))
    assert abs(f["total"] / 100.6e9 - 1) < 0.02, f
    assert abs(f["scans"] / 26.96e9 - 1) < 0.002, f
    # measured: encoder 58.48 (-0.5%), DCIM 12.15 (-0.4%), decoder 28.95 (-1.9%: its LayerNorms and
    # bilinear upsamplings), CGM 0.107 (-11%: at this size fvcore's pooling and BN count are most of it)
    for part, pub, tol in (("encoder", 58.8e9, 0.02), ("dcim", 12.2e9, 0.02), ("decoder", 29.5e9, 0.025),
                           ("cgm", 0.12e9, 0.15)):
        assert abs(f[part] / pub - 1) < tol, (part, f)
    assert abs(f["other"]) < 1e-6 * f["total"]


def test_bf16_autocast_runs():
    """Mixed precision as training uses it: every module accepts bf16 activations. The bound is
    loose on purpose (bf16 keeps 8 bits; measured 1.2e-2 relative max error after ~20 layers)."""
    m = small().eval()
    g = torch.Generator().manual_seed(6)
    ct, pet = torch.randn(1, 1, 32, 32, generator=g), torch.randn(1, 1, 32, 32, generator=g)
    with torch.no_grad():
        ref = m(ct, pet)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(ct, pet)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 5e-2


def test_count_flops_leaves_the_model_alone():
    m = small(backend=None)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    f = count_flops(m, (64, 96), batch=2)
    assert f["total"] > f["scans"] > 0 and f["other"] == 0
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert all(mod.backend is None for mod in m.modules() if isinstance(mod, SS2D))


def test_activation_errors_follow_the_forward():
    """vmambax.testing.activation_errors (benchmarks/model_error_map.py --activations): every SS2D and
    CGM output, in the order they run, with the float32 reference's error; the reference backend in
    float32 repeats that run exactly on CPU."""
    from vmambax.models.fusion import CGM
    from vmambax.testing import activation_errors
    from vmambax_kernels.modules import SS2D

    torch.manual_seed(0)
    model = VMambaX(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), decoder_depth=1).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, (SS2D, CGM))]
    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
             for n, m in model.named_modules() if n in names]
    g = torch.Generator().manual_seed(1)
    ct, pet = (torch.rand(1, 1, 64, 64, generator=g) for _ in range(2))
    with torch.no_grad():
        model(ct, pet)
    for h in hooks:
        h.remove()
    errs = activation_errors(model, ct, pet, ["reference"], names)
    assert list(errs) == list(dict.fromkeys(order)) and set(errs) == set(names)
    assert all(e["reference"] == e["ref32"] for e in errs.values())       # both statistics
    assert any(e["ref32"]["max"] > 0 for e in errs.values())
    biases = [e["ref32"]["bias"] for e in errs.values()]
    assert all(-1 <= b <= 1 for b in biases) and any(biases)
    assert next(model.parameters()).dtype == torch.float32
