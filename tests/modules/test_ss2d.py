"""SS2D equals VMamba v0's SS2D written out plainly (cross-scan into four sequences, a loop scan per
direction, cross-merge), output and every gradient, by the tolerance rule; plus its drop-in contract."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from vmambax_kernels.modules import SS2D
from vmambax_kernels.testing import check_against_reference

V0_KEYS = ["x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds", "in_proj.weight",
           "conv2d.weight", "conv2d.bias", "out_norm.weight", "out_norm.bias", "out_proj.weight"]


class PlainSS2D(nn.Module):
    """VMamba v0's SS2D, straightforwardly: the parameter layout is VMamba's own."""

    def __init__(self, d_model, d_state, d_inner, dt_rank):
        super().__init__()
        Dm, N, R = d_inner, d_state, dt_rank
        self.x_proj_weight = nn.Parameter(torch.empty(4, R + 2 * N, Dm))
        self.dt_projs_weight = nn.Parameter(torch.empty(4, Dm, R))
        self.dt_projs_bias = nn.Parameter(torch.empty(4, Dm))
        self.A_logs = nn.Parameter(torch.empty(4 * Dm, N))
        self.Ds = nn.Parameter(torch.empty(4 * Dm))
        self.in_proj = nn.Linear(d_model, 2 * Dm, bias=False)
        self.conv2d = nn.Conv2d(Dm, Dm, 3, padding=1, groups=Dm)
        self.out_norm = nn.LayerNorm(Dm)
        self.out_proj = nn.Linear(Dm, d_model, bias=False)
        self.N, self.R = N, R

    def forward(self, x):
        Bt, H, W, _ = x.shape
        L, N, R = H * W, self.N, self.R
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = F.silu(self.conv2d(xs.permute(0, 3, 1, 2)))                      # (Bt, Dm, H, W)
        Dm = xs.shape[1]
        rows, cols = xs.flatten(2), xs.transpose(2, 3).flatten(2)             # (Bt, Dm, L)
        seqs = torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], 1)     # (Bt, 4, Dm, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", seqs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        A, D = -torch.exp(self.A_logs).view(4, Dm, N), self.Ds.view(4, Dm)
        ys = []
        for k in range(4):
            delta = F.softplus(dts[:, k] + self.dt_projs_bias[k][:, None])   # (Bt, Dm, L)
            h = seqs.new_zeros(Bt, Dm, N)
            out = []
            for t in range(L):
                d_t = delta[:, :, t, None]
                h = torch.exp(d_t * A[k]) * h + d_t * Bs[:, k, None, :, t] * seqs[:, k, :, t, None]
                out.append((h * Cs[:, k, None, :, t]).sum(-1) + D[k] * seqs[:, k, :, t])
            ys.append(torch.stack(out, -1))
        cross = (ys[1] + ys[3].flip(-1)).view(Bt, Dm, W, H).transpose(2, 3).reshape(Bt, Dm, L)
        y = ys[0] + ys[2].flip(-1) + cross
        y = self.out_norm(y.transpose(1, 2).reshape(Bt, H, W, Dm))
        return self.out_proj(y * F.silu(z))


def _pair(d_model=6, d_state=4, seed=0):
    torch.manual_seed(seed)
    ours = SS2D(d_model, d_state=d_state)
    with torch.no_grad():  # perturb away from the init so every parameter matters
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain = PlainSS2D(d_model, d_state, ours.d_inner, ours.dt_rank)
    plain.load_state_dict(ours.state_dict(), strict=True)  # VMamba's layout loads unchanged
    return ours, plain


@pytest.mark.parametrize("Bt,H,W", [(2, 3, 5), (6, 4, 4), (1, 1, 7)])
def test_matches_plain_vmamba_v0(Bt, H, W):
    ours, plain = _pair()
    params = {k: v.detach() for k, v in ours.named_parameters()}
    g = torch.Generator().manual_seed(3)
    inputs = {"x": torch.randn(Bt, H, W, ours.d_model, generator=g), **params}

    def run(module):
        return lambda x, **p: functional_call(module, p, (x,))

    check_against_reference(run(ours), run(plain), inputs)  # output and the grad of x and every parameter


def test_state_dict_names_and_init():
    m = SS2D(96)
    assert list(m.state_dict()) == V0_KEYS
    Dm, N, R = 192, 16, 6
    assert (m.d_inner, m.d_state, m.dt_rank) == (Dm, N, R)
    assert m.x_proj_weight.shape == (4, R + 2 * N, Dm) and m.A_logs.shape == (4 * Dm, N)
    assert torch.equal(m.A_logs, torch.log(torch.arange(1, N + 1.0)).expand(4 * Dm, N))
    assert torch.equal(m.Ds, torch.ones(4 * Dm))
    dt = F.softplus(m.dt_projs_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert m.dt_projs_weight.abs().max() <= R ** -0.5


def test_compat_arguments():
    ref = SS2D(8, d_state=4, ssm_ratio=2.0)
    alias = SS2D(8, d_state=4, expand=2, dropout=0.0, shared_ssm=False, softmax_version=False)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in alias.state_dict().items()}
    assert SS2D(12, d_state="auto").d_state == math.ceil(12 / 6)
    no_conv = SS2D(8, d_state=4, d_conv=0)
    assert "conv2d.weight" not in no_conv.state_dict()
    assert no_conv(torch.randn(1, 2, 3, 8)).shape == (1, 2, 3, 8)
    with pytest.raises(TypeError, match="unexpected keyword argument 'd_sate'"):
        SS2D(8, d_sate=4)
    with pytest.raises(ValueError, match="softmax_version: expected False"):
        SS2D(8, softmax_version=True)


def test_bad_input_and_backend():
    m = SS2D(8, d_state=4)
    with pytest.raises(ValueError, match=r"x: expected shape \(Bt, H, W, 8\).*got \(1, 8, 3, 3\)"):
        m(torch.randn(1, 8, 3, 3))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        m([1.0])
    m.backend = "cuda"  # passed through to the scan, which says why it cannot run on CPU tensors
    with pytest.raises(RuntimeError, match="cuda"):
        m(torch.randn(1, 3, 3, 8))
    m.backend = "reference"
    assert m(torch.randn(1, 3, 3, 8)).shape == (1, 3, 3, 8)
