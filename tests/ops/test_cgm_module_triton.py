"""The fused CGM module path (vmambax_kernels.cgm.module_triton) vs the PyTorch module: outputs,
the gradients of both inputs and of every parameter, and BatchNorm's running stats, in train and
eval mode, by STYLE.md's rule (vmambax_kernels.testing). The references are the same module on its
PyTorch path (channel MLP in PyTorch, the gate's reference backend) in float64 and float32.

CPU: the kernels run under TRITON_INTERPRET=1 on tiny shapes. GPU (-m gpu): the four stage shapes.
"""
import copy

import pytest
import torch
import torch.nn as nn

from vmambax.models.fusion import CGM
from vmambax_kernels.cgm import module_triton, triton as gate
from vmambax_kernels.testing import TEST_DEVICE as DEVICE, assert_close_by_rule

pytestmark = pytest.mark.timeout(180)


def make_module(C, seed=0, residual=True, hidden=None):
    """A CGM with BatchNorm affine parameters and running stats away from their init values;
    ``hidden`` sets the MLP's hidden width (the model's is max(C // 4, 32))."""
    torch.manual_seed(seed)
    m = CGM(C, residual=residual, backend="triton", **({} if hidden is None else dict(reduction=C, min_channel=hidden)))
    with torch.no_grad():
        for mlp in (m.channel_gate_rgb, m.channel_gate_pet):
            bn = mlp[1]
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return m


def step(m, xs, gs):
    """One forward + backward: (outputs, {name: gradient} for the inputs and every parameter)."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    for p in m.parameters():
        p.grad = None
    ys = m(*leaves)
    torch.autograd.backward(ys, gs)
    grads = {"x_ct": leaves[0].grad, "x_pet": leaves[1].grad}
    grads.update({n: p.grad for n, p in m.named_parameters()})
    return [y.detach() for y in ys], grads


def run_and_compare(C, shape, dtype, training, residual=True, steps=1, channels_last=False, seed=0, hidden=None):
    Bt, H, W = shape
    g = torch.Generator().manual_seed(seed + 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(Bt, C, H, W, generator=g).to(dtype).contiguous(memory_format=fmt) for _ in range(2)]
    # the outputs' gradients as autograd hands them to a 16-bit output: rounded to its dtype
    gs = [torch.randn(Bt, C, H, W, generator=g).to(dtype) for _ in range(2)]
    fast = make_module(C, seed, residual, hidden).train(training).to(DEVICE)
    refs = {}
    for name, rdt in (("64", torch.float64), ("32", torch.float32)):
        r = copy.deepcopy(fast).to("cpu", rdt)   # the references run on the CPU (no TF32)
        r.backend = "reference"
        refs[name] = r
    assert module_triton.supported("triton", xs[0].to(DEVICE), xs[1].to(DEVICE), fast.channel_gate_rgb,
                                   fast.channel_gate_pet) is None
    for _ in range(steps):
        out, grads = step(fast, [x.to(DEVICE) for x in xs], [t.to(DEVICE) for t in gs])
        r64 = step(refs["64"], [x.double() for x in xs], [t.double() for t in gs])
        r32 = step(refs["32"], [x.float() for x in xs], [t.float() for t in gs])
    for i, name in enumerate(("y_ct", "y_pet")):
        assert out[i].dtype == dtype
        if channels_last:
            assert out[i].is_contiguous(memory_format=torch.channels_last)
        assert_close_by_rule(name, out[i].cpu(), r64[0][i], r32[0][i], dtype)
    for k in r64[1]:
        assert grads[k].dtype == (dtype if k.startswith("x_") else torch.float32), k
        assert_close_by_rule(f"grad {k}", grads[k].cpu(), r64[1][k], r32[1][k], grads[k].dtype)
    buffers = dict(fast.named_buffers())
    for k, b64 in refs["64"].named_buffers():
        b32 = dict(refs["32"].named_buffers())[k]
        if k.endswith("num_batches_tracked"):
            assert buffers[k].item() == b64.item() == (steps if training else 0), k
        else:
            assert_close_by_rule(k, buffers[k].cpu(), b64, b32)


# ---------------------------------------------------------------------------------------------
# CPU (interpreter), tiny shapes: C not a multiple of any block, odd planes, Bt not a power of 2
# ---------------------------------------------------------------------------------------------
def test_train_fp32_two_steps():
    """Batch statistics, the running-stat update twice, num_batches_tracked 2."""
    run_and_compare(20, (3, 7, 5), torch.float32, training=True, steps=2)


def test_eval_plain_channels_last():
    """Eval: BatchNorm from the running stats; the plain variant; channels-last in and out."""
    run_and_compare(12, (2, 5, 6), torch.float32, training=False, residual=False, channels_last=True, seed=3)


def test_train_bf16():
    run_and_compare(18, (2, 6, 7), torch.bfloat16, training=True, seed=5)


# The MLP runs on blocks of hidden units (first conv, BatchNorm, GELU; the backward through them),
# of output channels (second conv; dW2, db2) and of input channels (dp, dW1): under the interpreter
# every block is 16 wide, so these widths run several blocks of each, the last one partial.
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mlp_blocks_odd_widths(training):
    """C 37 (3 output blocks, 5 input blocks), hidden 37 (3 hidden blocks), batch 5: the running
    stats of every hidden block updated twice, num_batches_tracked once per step."""
    run_and_compare(37, (5, 2, 3), torch.float32, training, steps=2 if training else 1, seed=11, hidden=37)


def test_mlp_batch_over_16():
    """Batch 17: the batch tile 32 with 15 rows masked, in BatchNorm's statistics and backward."""
    run_and_compare(24, (17, 2, 3), torch.bfloat16, training=True, seed=13, hidden=20)


def test_mlp_gpu_block_sizes(monkeypatch):
    """The GPU's MLP block sizes (reduction chunks of 64, input-channel blocks of 32) with C 70,
    hidden 33: partial chunks and blocks in every launch."""
    monkeypatch.setattr(module_triton, "interpreting", lambda: False)
    assert module_triton._mlp_meta(3, 70, 33)["fwd_hid"]["BK"] == 64
    run_and_compare(70, (3, 2, 2), torch.float32, training=True, seed=17, hidden=33)


def test_mlp_batch_limit():
    x = torch.randn(module_triton.MAX_BB + 1, 8, 1, 1)
    m = make_module(8)
    assert "batch" in module_triton.supported("triton", x, x, m.channel_gate_rgb, m.channel_gate_pet)
    assert module_triton.supported("triton", x[:-1], x[:-1], m.channel_gate_rgb, m.channel_gate_pet) is None


@pytest.mark.parametrize("case", ["train_bf16", "eval_plain_fp32_channels_last"])
def test_gemm_variants(case):
    """The gate's GEMM form (cgm_triton.VARIANTS fwd_gemm, bwd_gemm) inside the module: the
    backward kernel with dp (the MLP's gradient through GAP), no dc partials."""
    gate.CONFIG_OVERRIDE.update({**gate.VARIANTS["fwd_gemm"], **gate.VARIANTS["bwd_gemm"]})
    try:
        if case == "train_bf16":
            run_and_compare(18, (2, 6, 7), torch.bfloat16, training=True, seed=5)
        else:
            run_and_compare(12, (2, 5, 6), torch.float32, training=False, residual=False, channels_last=True, seed=3)
    finally:
        gate.CONFIG_OVERRIDE.clear()


def test_plane_sums_of_sliced_planes():
    """Planes whose (h, w) strides do not merge (a column slice): the per-pixel division path."""
    g = torch.Generator().manual_seed(7)
    x, dy = (torch.randn(2, 5, 6, 11, generator=g)[..., 2:9] for _ in range(2))
    s = torch.rand(2, 2, 6, 7, generator=g)
    got = module_triton._plane_sums(x.to(DEVICE), x.flip(0).to(DEVICE), dy.to(DEVICE), dy.to(DEVICE),
                                    s.to(DEVICE)).sum(-1).cpu()

    def ref(dt):
        xs, ds, ss = x.to(dt), dy.to(dt), s.to(dt)
        return torch.stack([(xs * ds * ss[:, 0, None]).sum((2, 3)), (xs.flip(0) * ds * ss[:, 1, None]).sum((2, 3))], 1)
    assert_close_by_rule("dc sums", got, ref(torch.float64), ref(torch.float32))


def test_fallbacks_keep_the_pytorch_path():
    """SyncBatchNorm, a BatchNorm without momentum and the reference backend run the PyTorch path."""
    x = torch.randn(2, 8, 4, 4)
    m = make_module(8).eval()
    assert module_triton.supported("triton", x, x, m.channel_gate_rgb, m.channel_gate_pet) is None
    assert module_triton.supported("reference", x, x, m.channel_gate_rgb, m.channel_gate_pet) is not None
    assert module_triton.supported("triton", x.double(), x.double(), m.channel_gate_rgb, m.channel_gate_pet)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(m))
    assert "SyncBatchNorm" in module_triton.supported("triton", x, x, sync.channel_gate_rgb, sync.channel_gate_pet)
    m.channel_gate_pet[1].momentum = None
    assert "momentum" in module_triton.supported("triton", x, x, m.channel_gate_rgb, m.channel_gate_pet)


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "plain"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("C", [192, 193])
def test_model_takes_the_fused_path(monkeypatch, C, dtype, autocast):
    """The model's CGM runs the fused module at any width, with 16-bit inputs (with or without
    autocast) and fp32, and gives the reference's outputs by the rule."""
    calls = []
    real = module_triton.cgm_module
    monkeypatch.setattr(module_triton, "cgm_module", lambda *a, **k: calls.append(C) or real(*a, **k))
    m = make_module(C).eval().to(DEVICE)
    x = torch.randn(2, C, 2, 3).to(dtype)
    # 16-bit inputs under autocast (as in the model) and without it (fp32 parameters)
    with torch.autocast(torch.device(DEVICE).type, dtype, enabled=autocast and dtype != torch.float32):
        ys = m(x.to(DEVICE), x.flip(0).to(DEVICE))
    assert calls == [C]
    refs = []
    for dt in (torch.float64, torch.float32):
        r = copy.deepcopy(m).to("cpu", dt)
        r.backend = "reference"
        refs.append(r(x.to(dt), x.flip(0).to(dt)))
    for i, y in enumerate(ys):
        assert_close_by_rule(f"y{i}", y.cpu(), refs[0][i], refs[1][i], dtype)


def test_state_dict_keys_unchanged():
    keys = list(CGM(8).state_dict())
    assert keys == [f"channel_gate_{m}.{k}" for m in ("rgb", "pet") for k in (
        "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
        "3.weight", "3.bias")] + ["spatial_gate_rgb.0.weight", "spatial_gate_pet.0.weight"]


# ---------------------------------------------------------------------------------------------
# GPU: the stage shapes of DESIGN.md (cgm1..cgm4), train and eval
# ---------------------------------------------------------------------------------------------
GPU_CASES = {"cgm1": (96, (8, 128, 128)), "cgm2": (192, (8, 64, 64)), "cgm3": (384, (8, 32, 32)),
             "cgm4": (768, (8, 16, 16))}


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_gpu_stage_shapes(case, dtype, training):  # references on the CPU: no TF32
    C, shape = GPU_CASES[case]
    run_and_compare(C, shape, dtype, training, steps=2 if training else 1)


@pytest.mark.gpu
def test_gpu_outputs_fully_written():
    """NaN-poisoned blocks of the caching allocator are reused: every output and grad is written."""
    torch.full((1 << 24,), float("nan"), device="cuda")  # freed at once, its block reused
    run_and_compare(40, (3, 17, 33), torch.float16, training=True)
