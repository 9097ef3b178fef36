"""torch.compile(fullgraph=True) traces the whole model through the custom ops (issue 7): the
backend choice, the scan and the CGM gate ops, DCIM's windows, forward and backward.

On CPU the "aot_eager" backend runs Dynamo and AOTAutograd (what fullgraph and the ops' fake and
autograd registrations are about) without Inductor's code generation, which takes over 10 minutes
for this model on a 2-core CPU. On a GPU, Inductor with the fast backends.
"""
import pytest
import torch

from vmambax.models import VMambaX
from vmambax_kernels import available_backends
from vmambax_kernels.testing import assert_model_close_by_rule


def _compare(backend, compiler, device):
    torch.manual_seed(0)
    model = VMambaX(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), decoder_depth=1, decoder_drop_path_rate=0.0,
                    backend=backend).to(device).train()
    g = torch.Generator().manual_seed(3)
    ct, pet = (torch.randn(2, 1, 64, 64, generator=g).to(device) for _ in range(2))
    compiled = torch.compile(model, fullgraph=True, backend=compiler)

    def run(m):
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        out = m(ct, pet)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_c, grads_c = run(compiled)
    out_e, grads_e = run(model)
    # Both run the same arithmetic in other orders (Inductor fuses and reorders fp32 sums), so
    # they agree to fp32 rounding of each result's scale.
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6 * out_e.abs().max().item())
    assert grads_c.keys() == grads_e.keys()
    # Absolute tolerance on the scale of all gradients: conv biases ahead of a BatchNorm have a true
    # gradient of zero, so their own scale is rounding noise. Measured on CPU (aot_eager): largest
    # difference 1.2e-5 against a largest gradient of 35 (3.5e-7 of it).
    scale = max(g.abs().max().item() for g in grads_e.values())
    for name, ge in grads_e.items():
        torch.testing.assert_close(grads_c[name], ge, rtol=1e-4, atol=2e-6 * scale, msg=name)


def test_whole_model_compiles_fullgraph_and_matches_eager():
    _compare("reference", "aot_eager", "cpu")


@pytest.mark.gpu
# (not "reference": Inductor unrolls its Python loop over L; the compile ran past 4 minutes on H100)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_whole_model_compiles_with_inductor_on_gpu(backend):
    """Inductor generates its own kernels (fused, reordered, another LayerNorm/BatchNorm reduction),
    so the compiled fast model is held to STYLE.md's rule against the reference model in float64
    and float32, as tests/models/test_gpu.py holds the eager one (a 1e-5 relative bound against
    eager fp32 failed on H100 by 4e-5 absolute: two fp32 results compared with each other, rather
    than each with the float64 truth)."""
    status = available_backends()[backend]
    if not status.available:
        pytest.skip(f"{backend} backend not available: {status.reason}")
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 throughout
    try:
        torch.manual_seed(0)
        model = VMambaX(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), decoder_depth=1, drop_path_rate=0.0,
                        decoder_drop_path_rate=0.0, backend=backend).cuda().train()
        g = torch.Generator().manual_seed(3)
        ct, pet = (torch.randn(2, 1, 64, 64, generator=g).cuda() for _ in range(2))
        runs = {"fast": _run(torch.compile(model, fullgraph=True, backend="inductor"), model, ct, pet)}
        model.set_backend("reference")
        runs["ref32"] = _run(model, model, ct, pet)
        model.double()
        runs["ref64"] = _run(model, model, ct.double(), pet.double())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    assert_model_close_by_rule(runs["fast"], runs["ref32"], runs["ref64"])


def _run(fn, model, ct, pet):
    """Output and every parameter gradient of one training-mode step of ``fn`` (on the CPU)."""
    model.zero_grad(set_to_none=True)
    out = fn(ct, pet)
    out.square().mean().backward()
    return out.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
