"""Where the model's layout copies come from: every copy-like ATen op (copy_, clone, _to_copy, cat,
stack, pad) of one training step's forward and backward, with the bytes it moves (read + write),
grouped by the model line whose forward op ran it (backward ops are charged to the forward line
that made their autograd node, through anomaly mode's tracebacks).

    python benchmarks/count_copies.py [--size 128] [--batch 2] [--top 25]

CPU, float32, no autocast: dtype casts (autocast's) are not in it, layout copies are. The scan and
SS2D's fused glue ops (dwconv_silu, norm_gate) are replaced by stand-ins of the same shapes that copy
nothing (on a GPU the CUDA op's own transposed copies come on top). Copies inside convolutions are
those of the CPU's convolution and do not grow with the pixels as cuDNN's would (or would not).
The step runs at --batch and at twice it: per model line, the bytes that grow with the batch
(activations' layout copies) are scaled to batch 8 at 512x512, the rest (copies of parameter
gradients, the CPU convolution's weight copies) is counted once as measured; "ms" at 2.5 TB/s.
"""
from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

aten = torch.ops.aten
COPIES = {aten.copy_.default, aten.clone.default, aten._to_copy.default, aten.cat.default,
          aten.stack.default, aten.constant_pad_nd.default}


def _short(path: str, line) -> str | None:
    """path:line relative to the project's packages, or None outside them (and for this script)."""
    path = path.replace("\\", "/")
    for pkg in ("/vmambax_kernels/", "/vmambax/"):
        if pkg in path and "count_copies" not in path:
            return f"{pkg.strip('/')}/{path.split(pkg, 1)[1]}:{line}"
    return None


def _model_line(frames) -> str:
    """The innermost frame in the project's packages, as path:line."""
    return next((w for f in reversed(frames) if (w := _short(f.filename, f.lineno))), "?")


def _forward_line(node) -> str:
    """The model line whose forward made an autograd node (anomaly mode's traceback), or '?'."""
    tb = node.metadata.get("traceback_") if node is not None else None
    found = re.findall(r'File "([^"]+)", line (\d+)', "".join(tb or []))
    return next((w for path, line in reversed(found) if (w := _short(path, line))), "?")


class CopyCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = defaultdict(float)
        self.calls = defaultdict(int)
        self.backward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in COPIES:
            outs = out if isinstance(out, (list, tuple)) else [out]
            moved = sum(2 * t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
            if self.backward:
                key = ("backward", _forward_line(torch._C._current_autograd_node()), func.__name__)
            else:
                key = ("forward", _model_line(traceback.extract_stack()), func.__name__)
            self.bytes[key] += moved
            self.calls[key] += 1
        return out


# Stand-ins of the scan and of the two fused glue ops (same shapes and differentiable inputs, no
# copies of their own): what runs on a GPU in their place copies nothing that is counted here.
def _stand_in_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, *, backend=None):
    return x.float() * Ds.view(4, -1).sum(0).view(1, -1, 1, 1)


def _stand_in_dwconv(xs, weight, bias, *, backend=None):     # (Bt, H, W, Dm) -> (Bt, Dm, H, W)
    return xs.permute(0, 3, 1, 2) * weight.sum((1, 2, 3)).view(1, -1, 1, 1)


def _stand_in_norm_gate(y, z, weight, bias, eps, *, backend=None):  # (Bt, Dm, H, W), (Bt, H, W, Dm)
    return y.permute(0, 2, 3, 1) * z * weight


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    from vmambax.models import VMambaX
    from vmambax_kernels.modules import ss2d
    names = ("cross_selective_scan_2d", "dwconv_silu", "norm_gate", "fused_in_ss2d")
    saved = {n: getattr(ss2d, n) for n in names}
    ss2d.cross_selective_scan_2d, ss2d.dwconv_silu, ss2d.norm_gate = _stand_in_scan, _stand_in_dwconv, _stand_in_norm_gate
    ss2d.fused_in_ss2d = lambda *a, **k: True
    try:
        torch.manual_seed(0)
        model = VMambaX().train()
        s, b = args.size, args.batch
        one, two = (_count_step(model, n, s) for n in (b, 2 * b))
    finally:
        for n, f in saved.items():  # the module's attributes are shared with every other user
            setattr(ss2d, n, f)
    scale = 8 * 512 * 512 / (b * s * s)
    rows, fixed_total = [], 0.0
    for k in one.bytes.keys() | two.bytes.keys():
        grows = two.bytes[k] - one.bytes[k]          # the bytes of b more samples
        fixed = one.bytes[k] - grows
        rows.append((fixed + grows * scale, k))
        fixed_total += fixed
    rows.sort(reverse=True)
    total = sum(v for v, _ in rows)
    print(f"copy-like ops of one training step, scaled to batch 8 at 512x512: {total / 1e9:.2f} GB "
          f"({total / 2.5e12 * 1e3:.1f} ms at 2.5 TB/s; {fixed_total / 1e9:.2f} GB of it does not grow "
          f"with the batch); dtype casts and the CUDA op's own copies not included; copies inside "
          f"convolutions are the CPU's (cuDNN's differ)")
    print(f"{'GB':>8} {'ms':>6} {'calls':>6}  pass      op                  model line")
    for v, k in rows[: args.top]:
        print(f"{v / 1e9:8.3f} {v / 2.5e12 * 1e3:6.2f} {one.calls[k]:6d}  {k[0]:9s} {k[2]:19s} {k[1]}")


def _count_step(model, batch: int, size: int) -> CopyCounter:
    """The copies of one forward and backward of ``model`` on a (batch, 1, size, size) pair."""
    ct, pet = torch.rand(batch, 1, size, size), torch.rand(batch, 1, size, size)
    counter = CopyCounter()
    with torch.autograd.set_detect_anomaly(True, check_nan=False), counter:
        out = model(ct, pet)
        counter.backward = True
        out.backward(torch.ones_like(out))
    model.zero_grad(set_to_none=True)   # the second step's weight gradients start afresh, as the first's
    return counter


if __name__ == "__main__":
    main()
