"""SS2D: drop-in for the SS2D module of VMamba v0/v1 as used by vMambaX, Sigma and CIPA (SPEC.md section 3).

Same parameter names and shapes (``in_proj, conv2d, x_proj_weight, dt_projs_weight, dt_projs_bias,
A_logs, Ds, out_norm, out_proj``), so their state dicts load unchanged; the core runs through
``cross_selective_scan_2d``, which never materialises the four scanned copies.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dwconv.interface import dwconv_silu
from ..norm_gate.interface import norm_gate
from ..selective_scan.interface import cross_selective_scan_2d
from .glue import fused_in_ss2d


class SS2D(nn.Module):
    """Four-direction 2D selective-scan mixer, channels last.

    Args:
        d_model: channels of the input and output.
        d_state: state size N (1..64). ssm_ratio: Dm = int(ssm_ratio * d_model) inner channels
            (``expand`` is VMamba v0's name for it). dt_rank: R, "auto" = ceil(d_model / 16).
        d_conv: depthwise conv kernel; < 2 means no conv (SiLU only, as VMamba does).
        conv_bias, bias: biases of the depthwise conv and of in_proj/out_proj.
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: VMamba's dt initialisation.
        dropout: dropout after out_proj.
        shared_ssm: accepted for the codebases that pass it; their SS2D ignores it, so does this one.
        softmax_version: accepted when False (what they pass); True changes the math and is refused.
        backend: passed to ``cross_selective_scan_2d`` (None = automatic choice).

    forward(x): x (Bt, H, W, d_model) -> (Bt, H, W, d_model). The scan keeps fp32 state and returns
    fp32; out_norm's result is cast back to the dtype of the activations (bf16/fp16 under autocast).

    On CUDA tensors with a scan backend other than "reference", the glue around the scan runs as
    two Triton ops instead of PyTorch ops: the transpose, depthwise conv and SiLU of the input
    (``vmambax_kernels.dwconv_silu``, with the conv's fp32 parameters) and out_norm with the SiLU
    gate (``vmambax_kernels.norm_gate``: the product in fp32, rounded once). The attributes
    ``fused_dwconv`` and ``fused_norm_gate`` (default None) force each off (False) or allow it
    (True); None follows $VMAMBAX_FUSED_DWCONV / $VMAMBAX_FUSED_NORM_GATE ("0" turns it off).
    """

    fused_dwconv: bool | None = None
    fused_norm_gate: bool | None = None

    def __init__(self, d_model: int, d_state: int = 16, ssm_ratio: float = 2.0, dt_rank="auto",
                 d_conv: int = 3, conv_bias: bool = True, bias: bool = False, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, dropout: float = 0.0, shared_ssm: bool = False,
                 softmax_version: bool = False, expand: float | None = None, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        if softmax_version:
            raise ValueError("softmax_version: expected False (the only variant vMambaX, Sigma and CIPA "
                             "run), got True")
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model: expected a positive int, got {d_model!r}")
        if d_state == "auto":  # VMamba's 20240109 rule
            d_state = math.ceil(d_model / 6)
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init: expected 'random' or 'constant', got {dt_init!r}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, int(d_state), d_conv
        self.d_inner = int((ssm_ratio if expand is None else expand) * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = backend
        Dm, N, R = self.d_inner, self.d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * Dm, bias=bias, **fk)
        if d_conv > 1:
            self.conv2d = nn.Conv2d(Dm, Dm, d_conv, padding=(d_conv - 1) // 2, groups=Dm, bias=conv_bias, **fk)
        self.x_proj_weight = nn.Parameter(torch.empty(4, R + 2 * N, Dm, **fk))     # (K, R+2N, Dm)
        self.dt_projs_weight = nn.Parameter(torch.empty(4, Dm, R, **fk))          # (K, Dm, R)
        self.dt_projs_bias = nn.Parameter(torch.empty(4, Dm, **fk))               # (K, Dm)
        self.A_logs = nn.Parameter(torch.empty(4 * Dm, N, device=device))         # fp32 always
        self.Ds = nn.Parameter(torch.empty(4 * Dm, device=device))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        self.out_norm = nn.LayerNorm(Dm, **fk)
        self.out_proj = nn.Linear(Dm, d_model, bias=bias, **fk)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._dt_cfg = (dt_min, dt_max, dt_init, dt_scale, dt_init_floor)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """VMamba's init: x_proj like nn.Linear; dt_proj weight uniform(+-dt_scale/sqrt(R)) (or
        constant); dt bias = softplus^-1 of dt log-uniform in [dt_min, dt_max]; A_logs = log(1..N); Ds = 1."""
        dt_min, dt_max, dt_init, dt_scale, floor = self._dt_cfg
        Dm, N, R = self.d_inner, self.d_state, self.dt_rank
        bound = 1 / math.sqrt(Dm)  # nn.Linear's default (kaiming_uniform a=sqrt(5)) bound
        self.x_proj_weight.uniform_(-bound, bound)
        std = R ** -0.5 * dt_scale
        if dt_init == "constant":
            self.dt_projs_weight.fill_(std)
        else:
            self.dt_projs_weight.uniform_(-std, std)
        dt = torch.exp(torch.rand(4, Dm, device=self.Ds.device) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_logs.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(4 * Dm, N))
        self.Ds.fill_(1.0)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape (Bt, H, W, {self.d_model}) (channels last), "
                             f"got {tuple(x.shape)}")
        # in_proj as two GEMMs on its weight's halves, not chunk(2) of one: chunk's backward would
        # cat the halves' gradients into a (Bt, H, W, 2 Dm) copy; here autograd adds two
        # (Bt, H, W, d_model) input gradients. Same parameter, so state dicts are unchanged.
        w_x, w_z = self.in_proj.weight.chunk(2)
        b_x, b_z = (None, None) if self.in_proj.bias is None else self.in_proj.bias.chunk(2)
        xs, z = F.linear(x, w_x, b_x), F.linear(x, w_z, b_z)       # (Bt, H, W, Dm) each, contiguous
        if self.d_conv > 1 and fused_in_ss2d("dwconv_silu", self.backend, x.device.type, self.fused_dwconv):
            xs = dwconv_silu(xs, self.conv2d.weight, self.conv2d.bias, backend="triton")  # (Bt, Dm, H, W)
        else:
            xs = xs.permute(0, 3, 1, 2).contiguous()               # (Bt, Dm, H, W)
            xs = F.silu(self.conv2d(xs) if self.d_conv > 1 else xs)
        y = cross_selective_scan_2d(xs, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias,
                                    self.A_logs, self.Ds, backend=self.backend)  # (Bt, Dm, H, W) fp32
        if self.out_norm.weight is not None and fused_in_ss2d("norm_gate", self.backend, y.device.type,
                                                             self.fused_norm_gate):
            # one pass: y read channels first, z once, the gated (Bt, H, W, Dm) written in z's dtype
            y = norm_gate(y, z, self.out_norm.weight, self.out_norm.bias, self.out_norm.eps, backend="triton")
            return self.dropout(self.out_proj(y))
        # back to the activations' dtype (bf16 under autocast) before the gate, as VMamba does
        y = self.out_norm(y.permute(0, 2, 3, 1)).to(xs.dtype)     # (Bt, H, W, Dm)
        return self.dropout(self.out_proj(y * F.silu(z)))
