"""The inference forward of evaluation and prediction (vmambax.engine.inference): the logits of the
eager padded forward, whether replayed from CUDA graphs or not."""
import pytest
import torch

from vmambax.engine.common import autocast, forward_padded
from vmambax.engine.inference import InferenceForward
from vmambax.utils.tiny import TinySegNet


def _eager(model, dev, dtype, ct, pet):
    with torch.no_grad(), autocast(dev, dtype):
        return forward_padded(model, ct, pet)


def _inputs(shape, seed, dev):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.rand(shape, generator=g) * 3.2 - 1.6).to(dev) for _ in range(2))


def test_cpu_runs_eagerly_with_the_same_logits():
    model = TinySegNet().eval()
    run = InferenceForward(model, torch.device("cpu"), None, graphs=True)
    for seed in range(3):   # a shape seen again would be captured on a GPU; never on the CPU
        ct, pet = _inputs((2, 1, 40, 70), seed, "cpu")
        assert torch.equal(run(ct, pet), _eager(model, torch.device("cpu"), None, ct, pet))
    assert not run.graphs and not run.replaying


def _replay_matches_eager(model, dtype, shapes):
    dev = torch.device("cuda")
    run = InferenceForward(model, dev, dtype, graphs=True, max_graphs=2)
    for seed, shape in enumerate(shapes):
        ct, pet = _inputs(shape, seed, dev)   # new values each call: the replay must read them
        out = run(ct, pet)
        ref = _eager(model, dev, dtype, ct, pet)
        assert out.shape == ref.shape and torch.equal(out, ref), f"call {seed}, shape {shape}"
        assert len(run._cache) <= 2
    return run


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_replay_equals_eager_across_shapes(dtype):
    model = TinySegNet().cuda().eval()
    a, b, c = (2, 1, 64, 96), (1, 1, 64, 96), (2, 1, 50, 70)
    # a captured on its second call; b too; c evicts a; a is captured again
    run = _replay_matches_eager(model, dtype, [a, a, a, b, b, a, c, c, a, a])
    assert run.graphs and run.replaying


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_replay_equals_eager_vmambax(backend):
    """The model with the custom ops (the scan, the CGM gate) under bf16 autocast, as evaluation runs it."""
    from vmambax.models.vmambax import vmambax_tiny
    from vmambax_kernels import available_backends
    status = available_backends()[backend]
    if not status.available:
        pytest.skip(f"{backend} backend not available: {status.reason}")
    torch.manual_seed(0)
    model = vmambax_tiny().cuda().eval().set_backend(backend)
    run = _replay_matches_eager(model, torch.bfloat16, [(2, 1, 128, 96)] * 3)
    assert run.replaying
