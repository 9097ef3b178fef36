"""Input validation shared by every public op: one message style, naming argument, expected, actual."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_STATE = 64


def tensor(name: str, x, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    return x


def shape(name: str, x: torch.Tensor, expected: tuple) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(x.shape)}")


def same_dtype(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {x.dtype}")


def same_device(tensors: dict[str, torch.Tensor | None]) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{n}: expected device {first.device} (the device of {first_name}), got {t.device}")
    return first.device


def _check_finite_here(x: torch.Tensor) -> bool:
    """On the GPU the check is a host sync per call (and breaks graph capture and fullgraph
    compilation), so there it is opt-in through VMAMBAX_CHECK_FINITE=1; CPU tensors are always checked."""
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return False
    if x.device.type == "cpu":
        return True
    return os.environ.get("VMAMBAX_CHECK_FINITE") == "1" and not torch.cuda.is_current_stream_capturing()


def finite(name: str, x: torch.Tensor) -> None:
    """Parameters only (small); activations are never scanned for NaN on the hot path."""
    if _check_finite_here(x) and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{name}: expected finite values, got {bad} non-finite entries")


def supported_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected one of float32/bfloat16/float16/float64, got {x.dtype}")


def planes(name: str, x) -> torch.Size:
    """A (Bt, channels, H, W) tensor of a supported dtype with no empty dimension; its shape."""
    tensor(name, x, 4)
    supported_dtype(name, x)
    if min(x.shape) < 1:
        raise ValueError(f"{name}: expected every dimension >= 1, got shape {tuple(x.shape)}")
    return x.shape


def selective_scan_2d_args(u, delta, A, B, C, D, delta_bias, out_dtype, check_finite=True):
    """Validate SPEC.md section 1 arguments; return (Bt, Dm, H, W, N) and the device."""
    Bt, Dm, H, W = planes("u", u)
    tensor("A", A, 3)
    if A.shape[0] != 4 or A.shape[1] != Dm:
        raise ValueError(f"A: expected shape (4, {Dm}, N), got {tuple(A.shape)}")
    N = A.shape[2]
    if not 1 <= N <= MAX_STATE:
        raise ValueError(f"A: expected a state size N in [1, {MAX_STATE}], got N={N}")
    tensor("delta", delta, 5)
    shape("delta", delta, (Bt, 4, Dm, H, W))
    same_dtype("delta", delta, "u", u)
    for n, t in (("B", B), ("C", C)):
        tensor(n, t, 5)
        shape(n, t, (Bt, 4, N, H, W))
        same_dtype(n, t, "u", u)
    params = {"A": A, "D": D, "delta_bias": delta_bias}
    for n, t in params.items():
        if t is None:
            continue
        tensor(n, t)
        if n != "A":
            shape(n, t, (4, Dm))
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{n}: expected float32 (or float64), got {t.dtype}")
        if check_finite:
            finite(n, t)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected one of float32/bfloat16/float16/float64, got {out_dtype}")
    device = same_device({"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias})
    return (Bt, Dm, H, W, N), device


def cross_selective_scan_2d_args(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
    """Validate SPEC.md section 1 (module form); return (Bt, Dm, H, W, N, R)."""
    Bt, Dm, H, W = planes("x", x)
    tensor("A_logs", A_logs, 2)
    if A_logs.shape[0] != 4 * Dm:
        raise ValueError(f"A_logs: expected shape ({4 * Dm}, N), got {tuple(A_logs.shape)}")
    N = A_logs.shape[1]
    if not 1 <= N <= MAX_STATE:
        raise ValueError(f"A_logs: expected a state size N in [1, {MAX_STATE}], got N={N}")
    tensor("dt_projs_weight", dt_projs_weight, 3)
    if dt_projs_weight.shape[:2] != (4, Dm):
        raise ValueError(f"dt_projs_weight: expected shape (4, {Dm}, R), got {tuple(dt_projs_weight.shape)}")
    R = dt_projs_weight.shape[2]
    tensor("x_proj_weight", x_proj_weight, 3)
    shape("x_proj_weight", x_proj_weight, (4, R + 2 * N, Dm))
    tensor("dt_projs_bias", dt_projs_bias, 2)
    shape("dt_projs_bias", dt_projs_bias, (4, Dm))
    tensor("Ds", Ds, 1)
    shape("Ds", Ds, (4 * Dm,))
    for n, t in (("A_logs", A_logs), ("Ds", Ds), ("dt_projs_bias", dt_projs_bias)):
        finite(n, t)
    same_device({"x": x, "x_proj_weight": x_proj_weight, "dt_projs_weight": dt_projs_weight,
                 "dt_projs_bias": dt_projs_bias, "A_logs": A_logs, "Ds": Ds})
    return Bt, Dm, H, W, N, R


def cgm_gate_args(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet):
    """Validate SPEC.md section 2; return (Bt, C, H, W) and the device."""
    Bt, C, H, W = planes("x_ct", x_ct)
    tensor("x_pet", x_pet, 4)
    shape("x_pet", x_pet, (Bt, C, H, W))
    same_dtype("x_pet", x_pet, "x_ct", x_ct)
    for n, t in (("c_ct", c_ct), ("c_pet", c_pet)):
        tensor(n, t, 2)
        shape(n, t, (Bt, C))
    for n, t in (("w_ct", w_ct), ("w_pet", w_pet)):
        tensor(n, t, 4)
        shape(n, t, (1, 2 * C, 3, 3))
    device = same_device({"x_ct": x_ct, "x_pet": x_pet, "c_ct": c_ct, "c_pet": c_pet, "w_ct": w_ct, "w_pet": w_pet})
    return (Bt, C, H, W), device


def norm_gate_args(y, z, weight, bias, eps):
    """Validate the norm-gate's arguments (y channels first, z channels last); return the device."""
    Bt, Dm, H, W = planes("y", y)
    tensor("z", z, 4)
    supported_dtype("z", z)
    shape("z", z, (Bt, H, W, Dm))
    for n, t in (("weight", weight), ("bias", bias)):
        tensor(n, t, 1)
        supported_dtype(n, t)
        shape(n, t, (Dm,))
    norm_eps(eps)
    return same_device({"y": y, "z": z, "weight": weight, "bias": bias})


def norm_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")


def layer_norm_args(x, weight, bias, eps, out_dtype):
    """Validate layer_norm's arguments (x (..., C), weight and bias (C,) or None); return the device."""
    tensor("x", x)
    supported_dtype("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected at least one dimension and a last dimension >= 1, got shape {tuple(x.shape)}")
    for n, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            tensor(n, t, 1)
            supported_dtype(n, t)
            shape(n, t, (x.shape[-1],))
    norm_eps(eps)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected one of float32/bfloat16/float16/float64, got {out_dtype}")
    return same_device({"x": x, "weight": weight, "bias": bias})
