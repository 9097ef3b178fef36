"""Whether the Triton backends can run here: one answer for every op that has a Triton kernel."""
from __future__ import annotations

import os

import torch

MIN_TRITON = "3.6"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def availability() -> str | None:
    """None when Triton kernels can run here, else why not. Never raises."""
    try:
        import triton
        from packaging.version import Version
    except ImportError as exc:
        return f"Triton is not installed ({exc}): pip install 'triton>={MIN_TRITON}'"
    try:
        if Version(triton.__version__).release < Version(MIN_TRITON).release:
            return f"Triton {triton.__version__} is too old: pip install 'triton>={MIN_TRITON}'"
    except Exception as exc:  # an unparsable version string must not break available_backends()
        return f"cannot read the Triton version {getattr(triton, '__version__', '?')!r}: {exc}"
    if interpreting() or torch.cuda.is_available():
        return None
    return ("no CUDA GPU is visible (torch.cuda.is_available() is False); "
            "set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors (slow, for tests)")


def fix_interpreter_index() -> None:
    """Let the interpreter use a scalar kernel argument as a loop bound under numpy >= 2.3.

    Triton 3.6's interpreter holds scalar arguments as 1-element arrays and converts them with
    int(array), which numpy 2.3+ rejects ("only 0-dimensional arrays can be converted").
    Idempotent; a no-op where the interpreter's internals differ.
    """
    try:
        from triton.runtime import interpreter
        orig = interpreter._patch_lang_tensor
    except (ImportError, AttributeError):
        return
    if getattr(orig, "_vmambax_fixed", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._vmambax_fixed = True
    interpreter._patch_lang_tensor = patched
