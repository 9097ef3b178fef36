"""Build script: the CUDA extension `vmambax_kernels._C` is built only where it can be.

Switches (environment variables, flash-attention style):
  VMAMBAX_FORCE_BUILD=1      build the extension or fail loudly (no silent pure-Python install)
  VMAMBAX_SKIP_CUDA_BUILD=1  never build it (pure-Python install; Triton/reference backends only)
  VMAMBAX_CUDA_ARCHS="80;90" target architectures (default: 80;90)
Without nvcc or without a CUDA build of torch the package installs as pure Python.
Build without isolation so the installed torch is the one compiled against:
  pip install --no-build-isolation .
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_extension():
    """Return ([ext], cmdclass) or ([], {}) with a printed reason."""
    if _flag("VMAMBAX_SKIP_CUDA_BUILD"):
        print("vmambax: VMAMBAX_SKIP_CUDA_BUILD set, pure-Python install", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:  # build isolation hides the installed torch
        reason = f"torch not importable at build time ({exc}); use --no-build-isolation"
        if _flag("VMAMBAX_FORCE_BUILD"):
            raise RuntimeError(reason)
        print(f"vmambax: {reason}; pure-Python install", file=sys.stderr)
        return [], {}
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    reason = None
    if not nvcc:
        reason = "nvcc not found"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    if reason:
        if _flag("VMAMBAX_FORCE_BUILD"):
            raise RuntimeError(f"VMAMBAX_FORCE_BUILD set but {reason}")
        print(f"vmambax: {reason}; pure-Python install (Triton/reference backends)", file=sys.stderr)
        return [], {}
    from csrc_build import extension_kwargs  # noqa: E402  (kept beside setup.py: one place for flags)

    ext = CUDAExtension(name="vmambax_kernels._C", **extension_kwargs(ROOT, os.environ.get("VMAMBAX_CUDA_ARCHS", "80;90")))
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


sys.path.insert(0, str(ROOT))
ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
