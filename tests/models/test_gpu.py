"""vMambaX on the GPU: the published outputs through every backend, and a whole forward+backward
of the fast backends held to the tolerance rule against the reference model in float64/float32."""
import pytest
import torch

from vmambax.models import from_reference_checkpoint
from vmambax.models.fusion import CGM
from vmambax.models.vmambax import set_backend
from vmambax.testing import model_runs, module_ratios
from vmambax_kernels.modules import SS2D
from vmambax_kernels import available_backends
from vmambax_kernels.testing import assert_model_close_by_rule

pytestmark = pytest.mark.gpu
REL_TOL = 1e-4  # as the CPU golden test (measured there: <= 3.4e-6)


def _backend_or_skip(backend):
    status = available_backends()[backend]
    if not status.available:
        pytest.skip(f"{backend} backend not available: {status.reason}")


@pytest.fixture(scope="module")
def gpu_model(published_state_dict):
    # full fp32: cuDNN convolutions default to TF32 (10-bit mantissa), 4e-4 off the golden logits
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield from_reference_checkpoint(published_state_dict).cuda()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_golden_outputs_on_gpu(gpu_model, golden, backend):
    _backend_or_skip(backend)
    ct, pet = (x.cuda() for x in golden["inputs_ct_pet"])
    with torch.no_grad():
        logits = gpu_model.set_backend(backend)(ct, pet).cpu()
    ref = golden["logits"]
    rel = ((logits - ref).abs().max() / ref.abs().max()).item()
    assert rel <= REL_TOL, f"{backend}: relative error {rel:.2e} of the logits"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_forward_backward_by_the_rule(gpu_model, backend):
    """Batch 2, 128x128, eval mode (deterministic): logits and every parameter's gradient of the
    fast backend against the reference backend in float64 (ref64) and float32 (ref32)."""
    _backend_or_skip(backend)
    g = torch.Generator().manual_seed(7)
    ct, pet = torch.rand(2, 1, 128, 128, generator=g) * 3.2 - 1.6, torch.rand(2, 1, 128, 128, generator=g) * 3.2 - 1.6
    grad_out = torch.randn(2, 1, 128, 128, generator=g)
    runs = {}
    for name, dtype, be in (("fast", torch.float32, backend), ("ref32", torch.float32, "reference"),
                            ("ref64", torch.float64, "reference")):
        model = gpu_model.to(dtype).set_backend(be)
        model.zero_grad(set_to_none=True)
        out = model(ct.to("cuda", dtype), pet.to("cuda", dtype))
        out.backward(grad_out.to(out))
        runs[name] = (out.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()})
    gpu_model.float()
    assert_model_close_by_rule(runs["fast"], runs["ref32"], runs["ref64"])


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_each_module_on_the_model_activations_by_the_rule(gpu_model, backend):
    """Every SS2D and CGM module alone, on the activations the float64 reference model feeds it (the
    inputs of the test above): outputs, input gradients and parameter gradients by the rule. The
    whole-model test compounds ~100 such modules; this one says whether each keeps the rule on the
    model's own activations (benchmarks/model_error_map.py prints the ratios)."""
    _backend_or_skip(backend)
    g = torch.Generator().manual_seed(7)
    ct, pet = torch.rand(2, 1, 128, 128, generator=g) * 3.2 - 1.6, torch.rand(2, 1, 128, 128, generator=g) * 3.2 - 1.6
    grad_out = torch.randn(2, 1, 128, 128, generator=g)
    names = [n for n, m in gpu_model.named_modules() if isinstance(m, (SS2D, CGM))]
    _, captured = model_runs(gpu_model, ct, pet, grad_out, [], capture=names)
    ratios = module_ratios(gpu_model, captured, [backend], set_backend)
    assert len(ratios) == len(names)
    bad = [f"{n} {k}: {v:.3f}" for n, per in ratios.items() for k, v in per[backend].items() if v > 1]
    assert not bad, f"{len(bad)} results break the rule (ratio > 1):\n" + "\n".join(bad)
