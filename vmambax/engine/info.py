"""What this install is: versions, device, kernel backends (and why the others cannot run)."""
from __future__ import annotations

import platform
import sys


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # any import failure just means "not usable here"
        return None


def info() -> dict:
    import torch

    import vmambax
    import vmambax_kernels
    from vmambax_kernels._backend import OPS
    cuda = torch.cuda.is_available()
    out = {
        "vmambax": vmambax.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "numpy": _version("numpy"),
        "triton": _version("triton"), "nibabel": _version("nibabel"),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "backends": {},
    }
    for op in OPS:
        out["backends"][op] = {b: {"available": s.available, "reason": s.reason}
                               for b, s in vmambax_kernels.available_backends(op).items()}
    return out


def format_info(d: dict) -> str:
    lines = [f"vmambax {d['vmambax']}  python {d['python']}  torch {d['torch']} (CUDA {d['torch_cuda']})  "
             f"numpy {d['numpy']}  triton {d['triton']}  nibabel {d['nibabel']}",
             f"platform: {d['platform']}",
             f"device: {d['device']}"
             + (f"  ({d['gpus']} GPU(s), bf16 {'yes' if d['bf16'] else 'no'})" if d["gpus"] else "")]
    for op, bs in d["backends"].items():
        lines.append(f"{op} backends:")
        for b, s in bs.items():
            lines.append(f"  {b:<10} {'yes' if s['available'] else 'no ':<4} {'' if s['available'] else s['reason']}")
    return "\n".join(lines)
