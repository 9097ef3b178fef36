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


def test_cpu_compiled_forward_with_dynamo_alone():
    """torch.compile's plumbing on the CPU: Dynamo with its "eager" backend runs the traced graph
    with the same ops, so the logits are the eager ones bit for bit (Inductor needs a C++
    compiler and minutes here: the GPU test below runs it)."""
    model = TinySegNet().eval()
    run = InferenceForward(model, torch.device("cpu"), None, compile="eager")
    for seed in range(2):
        ct, pet = _inputs((2, 1, 40, 70), seed, "cpu")
        assert torch.equal(run(ct, pet), _eager(model, torch.device("cpu"), None, ct, pet))
    assert run.compiled


def test_cpu_failed_compile_falls_back_to_the_model(caplog):
    def no_compiler(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    model = TinySegNet().eval()
    run = InferenceForward(model, torch.device("cpu"), None, compile=no_compiler)
    ct, pet = _inputs((1, 1, 32, 32), 0, "cpu")
    with caplog.at_level("WARNING", logger="vmambax.engine.inference"):
        out = run(ct, pet)
    assert torch.equal(out, _eager(model, torch.device("cpu"), None, ct, pet))
    assert not run.compiled and "no C++ compiler here" in caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["tiny_segnet", "vmambax_cuda"])
def test_gpu_compiled_replay_equals_compiled_forward(which):
    """Inductor, then graphs: the replay gives the compiled forward's logits bit for bit (the
    compiled model's numerics against the eager one are tests/models/test_compile.py's)."""
    from vmambax_kernels import available_backends
    dev = torch.device("cuda")
    torch.manual_seed(0)
    if which == "tiny_segnet":
        model = TinySegNet().cuda().eval()
    else:
        from vmambax.models.vmambax import vmambax_tiny
        if not available_backends()["cuda"].available:
            pytest.skip("cuda backend not available")
        model = vmambax_tiny().cuda().eval().set_backend("cuda")
    run = InferenceForward(model, dev, torch.bfloat16, graphs=True, compile=True)
    for seed in range(3):
        ct, pet = _inputs((2, 1, 64, 96), seed, dev)
        out = run(ct, pet)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            ref = forward_padded(run.net, ct, pet)
        assert torch.equal(out, ref), f"call {seed}"
    assert run.compiled and run.replaying


def test_cpu_compiled_pads_a_smaller_batch_to_the_compiled_size():
    """A split's last, smaller batch runs padded to the batch size already compiled, instead of
    compiling again; its logits are those of the samples alone."""
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(tuple(example_inputs[0].shape) if example_inputs else ())
        return gm.forward

    model = TinySegNet().eval()
    run = InferenceForward(model, torch.device("cpu"), None, compile=counting)
    ct, pet = _inputs((4, 1, 40, 70), 0, "cpu")
    n_first = None
    for part in (slice(0, 4), slice(0, 4), slice(1, 3), slice(3, 4)):
        out = run(ct[part], pet[part])
        assert torch.equal(out, _eager(model, torch.device("cpu"), None, ct[part], pet[part])), part
        n_first = n_first or len(compiles)
    assert n_first >= 1 and len(compiles) == n_first and run.compiled   # batches 2 and 1 compiled nothing
    other, other_pet = _inputs((2, 1, 32, 32), 1, "cpu")   # another image size: compiles anew, unpadded
    assert run(other, other_pet).shape[0] == 2 and len(compiles) > n_first
