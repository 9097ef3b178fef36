"""Public API contract: backend choice, availability report, bad input raises with a clear message."""
import pytest
import torch

import vmambax_kernels as vk
from vmambax_kernels._backend import OPS
from vmambax_kernels.selective_scan import reference
from vmambax_kernels.testing import CPU_SHAPES, cast, scan_inputs

CASE = CPU_SHAPES["enc_tiny"]


def good():
    return scan_inputs(CASE, torch.float32)


def test_available_backends_reports_reasons():
    for op in OPS:
        status = vk.available_backends(op)
        assert set(status) == {"cuda", "triton", "reference"}
        assert status["reference"].available
        for name, s in status.items():
            assert isinstance(s.reason, str) and s.reason, name
            if not s.available:
                assert s.reason != "available"
    with pytest.raises(ValueError, match="op"):
        vk.available_backends("nope")


def test_unknown_backend_and_env_var(monkeypatch):
    with pytest.raises(ValueError, match="backend argument.*'fastest'"):
        vk.selective_scan_2d(**good(), backend="fastest")
    monkeypatch.setenv("VMAMBAX_BACKEND", "bogus")
    with pytest.raises(ValueError, match="VMAMBAX_BACKEND"):
        vk.selective_scan_2d(**good())
    monkeypatch.setenv("VMAMBAX_BACKEND", "reference")
    assert vk.selective_scan_2d(**good()).shape == (CASE.Bt, CASE.Dm, CASE.H, CASE.W)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_backend_refused_on_cpu_with_reason(monkeypatch):
    monkeypatch.delenv("VMAMBAX_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match="cuda"):
        vk.selective_scan_2d(**good(), backend="cuda")


def _with(**changes):
    kw = good()
    kw.update(changes)
    return kw


Bt, Dm, H, W, N = CASE.Bt, CASE.Dm, CASE.H, CASE.W, CASE.N
BAD = {
    "u rank": (dict(u=torch.randn(Dm, H, W)), ValueError, r"u: expected a 4-D tensor, got 3-D"),
    "u int": (dict(u=torch.ones(Bt, Dm, H, W, dtype=torch.int32)), TypeError, r"u: expected a floating-point"),
    "u not tensor": (dict(u=[1.0]), TypeError, r"u: expected a torch.Tensor, got list"),
    "delta shape": (dict(delta=torch.randn(Bt, 4, Dm, H, W + 1)), ValueError, r"delta: expected shape"),
    "delta dtype": (dict(delta=torch.randn(Bt, 4, Dm, H, W, dtype=torch.float16)), TypeError, r"delta: expected dtype torch.float32"),
    "B shape": (dict(B=torch.randn(Bt, 4, N + 1, H, W)), ValueError, r"B: expected shape"),
    "C dirs": (dict(C=torch.randn(Bt, 3, N, H, W)), ValueError, r"C: expected shape"),
    "N zero": (dict(A=torch.randn(4, Dm, 0), B=torch.randn(Bt, 4, 0, H, W), C=torch.randn(Bt, 4, 0, H, W)), ValueError, r"N in \[1, 64\], got N=0"),
    "N 65": (dict(A=-torch.rand(4, Dm, 65)), ValueError, r"N in \[1, 64\], got N=65"),
    "A dirs": (dict(A=-torch.rand(3, Dm, N)), ValueError, r"A: expected shape \(4, 24, N\)"),
    "A nan": (dict(A=torch.full((4, Dm, N), float("nan"))), ValueError, r"A: expected finite values"),
    "D shape": (dict(D=torch.randn(4, Dm + 1)), ValueError, r"D: expected shape \(4, 24\)"),
    "D half": (dict(D=torch.randn(4, Dm).half()), TypeError, r"D: expected float32"),
    "bias inf": (dict(delta_bias=torch.full((4, Dm), float("inf"))), ValueError, r"delta_bias: expected finite"),
    "empty": (dict(u=torch.randn(Bt, Dm, 0, W)), ValueError, r"u: expected every dimension >= 1"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_argument(name):
    changes, exc, msg = BAD[name]
    with pytest.raises(exc, match=msg):
        vk.selective_scan_2d(**_with(**changes), backend="reference")


def test_device_mismatch_named():
    meta = torch.randn(Bt, 4, N, H, W, device="meta")
    with pytest.raises(ValueError, match=r"B: expected device cpu \(the device of u\), got meta"):
        vk.selective_scan_2d(**_with(B=meta), backend="reference")


def test_cross_selective_scan_bad_inputs():
    x = torch.randn(2, 8, 3, 4)
    R, N = 1, 3
    args = dict(x=x, x_proj_weight=torch.randn(4, R + 2 * N, 8), dt_projs_weight=torch.randn(4, 8, R),
                dt_projs_bias=torch.randn(4, 8), A_logs=torch.randn(32, N), Ds=torch.randn(32))
    assert vk.cross_selective_scan_2d(**args).shape == (2, 8, 3, 4)
    for key, bad, msg in [("x_proj_weight", torch.randn(4, R + 2 * N + 1, 8), "x_proj_weight: expected shape"),
                          ("A_logs", torch.randn(31, N), r"A_logs: expected shape \(32, N\)"),
                          ("Ds", torch.randn(32, 1), "Ds: expected a 1-D"),
                          ("dt_projs_weight", torch.randn(3, 8, R), r"dt_projs_weight: expected shape \(4, 8, R\)"),
                          ("x", torch.randn(8, 3, 4), "x: expected a 4-D")]:
        with pytest.raises((ValueError, TypeError), match=msg):
            vk.cross_selective_scan_2d(**{**args, key: bad})


def test_cgm_gate_reference_and_bad_inputs():
    x_ct, x_pet = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    c_ct, c_pet = torch.rand(2, 3), torch.rand(2, 3)
    w_ct, w_pet = torch.randn(1, 6, 3, 3), torch.randn(1, 6, 3, 3)
    y_ct, y_pet = vk.cgm_gate(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, backend="reference")
    s_ct = torch.sigmoid(torch.nn.functional.conv2d(torch.cat([x_pet, x_ct], 1), w_ct, padding=1))
    torch.testing.assert_close(y_ct, x_ct * (1 + c_ct[:, :, None, None] * s_ct))
    y_ct0, _ = vk.cgm_gate(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual=False, backend="reference")
    torch.testing.assert_close(y_ct0, x_ct * c_ct[:, :, None, None] * s_ct)
    with pytest.raises(ValueError, match=r"x_pet: expected shape \(2, 3, 5, 4\)"):
        vk.cgm_gate(x_ct, x_pet[:, :2], c_ct, c_pet, w_ct, w_pet)
    with pytest.raises(ValueError, match=r"w_pet: expected shape \(1, 6, 3, 3\)"):
        vk.cgm_gate(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet[:, :3])
    with pytest.raises(ValueError, match=r"c_ct: expected a 2-D"):
        vk.cgm_gate(x_ct, x_pet, c_ct[..., None], c_pet, w_ct, w_pet)
    with pytest.raises(TypeError, match=r"x_pet: expected dtype torch.float32"):
        vk.cgm_gate(x_ct, x_pet.half(), c_ct, c_pet, w_ct, w_pet)


def test_reference_op_passes_opcheck():
    inputs = scan_inputs(CPU_SHAPES["n1"], torch.float32)
    args = (*[inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")], True, torch.float32)
    for a in args[:7]:
        a.requires_grad_(True)
    torch.library.opcheck(torch.ops.vmambax.selective_scan_2d_ref.default, args)


def test_reference_backward_op_passes_opcheck():
    # The backward is an op too (so a compiled backward does not unroll the reference's loop over L).
    case = CPU_SHAPES["n1"]
    inputs = scan_inputs(case, torch.float32)
    # B and C as split views of one tensor, as the model's x_proj gives them (non-contiguous inputs)
    B, C = torch.cat([inputs["B"], inputs["C"]], dim=2).split([case.N, case.N], dim=2)
    saved = (inputs["u"], inputs["delta"], inputs["A"], B, C, inputs["D"], inputs["delta_bias"])
    grad = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(1))
    op = torch.ops.vmambax.selective_scan_2d_ref_bwd.default
    torch.library.opcheck(op, (grad, *saved, True, torch.float32))
    # No D or delta_bias (empty gradients); no softplus, with delta >= 0 (negative steps grow the
    # state past float32, and NaN != NaN fails opcheck's comparison).
    torch.library.opcheck(op, (grad, saved[0], saved[1].abs(), *saved[2:5], None, None, False, torch.float32))


@pytest.mark.parametrize("with_D", [True, False])
def test_reference_op_gradients_equal_the_plain_reference(with_D):
    # Through the backward op (which differentiates selective_scan_2d_fast inside it) against autograd
    # through the spec's loop, with some inputs not requiring grad and, without D, two inputs None.
    inputs = cast(scan_inputs(CPU_SHAPES["dec_tiny"], torch.float64, with_D=with_D, with_bias=with_D), torch.float64)
    wanted = {"u", "A", "C", "D"} if with_D else {"u", "delta", "B"}
    a = {k: v.detach().clone().requires_grad_(k in wanted) if v is not None else None for k, v in inputs.items()}
    b = {k: v.detach().clone().requires_grad_(k in wanted) if v is not None else None for k, v in inputs.items()}
    y = vk.selective_scan_2d(**a, out_dtype=torch.float64, backend="reference")
    y_ref = reference.selective_scan_2d(**b, out_dtype=torch.float64)
    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(g)
    y_ref.backward(g)
    for k in sorted(wanted):
        assert a[k].grad.is_contiguous(), k
        torch.testing.assert_close(a[k].grad, b[k].grad, rtol=1e-11, atol=1e-13, msg=f"grad {k}")


def test_torch_compile_fullgraph_sees_the_reference_op():
    inputs = scan_inputs(CPU_SHAPES["row"], torch.float32)
    fn = torch.compile(lambda kw: vk.selective_scan_2d(**kw, backend="reference"), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(inputs), vk.selective_scan_2d(**inputs, backend="reference"))


def test_env_var_backend_an_op_lacks_keeps_the_automatic_choice(monkeypatch):
    # VMAMBAX_BACKEND=cuda sets the scans; cgm_gate has no CUDA C++ kernel, so it keeps the
    # automatic choice (a GPU training run with the variable set failed on the gate before).
    g = torch.Generator().manual_seed(0)
    x_ct, x_pet = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g)
    c_ct, c_pet = torch.rand(2, 4, generator=g), torch.rand(2, 4, generator=g)
    w_ct, w_pet = torch.randn(1, 8, 3, 3, generator=g), torch.randn(1, 8, 3, 3, generator=g)
    args = (x_ct, x_pet, c_ct, c_pet, w_ct, w_pet)
    monkeypatch.delenv("VMAMBAX_BACKEND", raising=False)
    expected = vk.cgm_gate(*args, backend="reference")
    monkeypatch.setenv("VMAMBAX_BACKEND", "cuda")
    for y, e in zip(vk.cgm_gate(*args), expected):
        torch.testing.assert_close(y, e, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no cuda implementation of cgm_gate"):
        vk.cgm_gate(*args, backend="cuda")  # an explicit request still raises
