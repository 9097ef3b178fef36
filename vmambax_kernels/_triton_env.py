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


def patch_interpreter() -> None:
    """Two fixes to Triton 3.6's CPU interpreter, applied once (no-ops where its internals differ):
    scalar kernel arguments usable as loop bounds under numpy >= 2.3, and device-function calls
    that no longer redo the launch's language patching. Changes nothing on a GPU."""
    _fix_interpreter_index()
    _skip_nested_lang_patch()


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter holds scalar arguments as 1-element arrays and converts them with
    int(array), which numpy 2.3+ rejects ("only 0-dimensional arrays can be converted")."""
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


def _skip_nested_lang_patch() -> None:
    """A kernel launch patches triton.language for the interpreter and restores it when the grid is
    done; the interpreter also re-runs that patching on every device-function (@jit helper) call
    inside the kernel, four inspect.getmembers walks each time, although the language is already
    patched the same way (the same builder; an already-patched member is no longer a builtin, so
    nothing is re-patched). That was ~22 % of the CPU tests' interpreter time (cProfile,
    dcim_inner_tiny forward). Inside a launch whose patching covers the helper's language modules,
    the helper's call now skips it."""
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter
        orig, scope_cls = interpreter._patch_lang, interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return
    if getattr(orig, "_vmambax_fixed", False):
        return
    active: list[set] = []   # the language modules patched by each launch in progress

    def langs(fn) -> set:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    class _LaunchScope:
        def __init__(self, scope):
            self.scope = scope

        def restore(self):
            self.scope.restore()
            active.pop()

    def patched(fn):
        mine = langs(fn)
        if active and mine <= active[-1]:
            return scope_cls()           # nothing to undo: the launch restores the language
        scope = orig(fn)
        if active:
            # A helper that sees a module the launch did not patch (Triton's own tl.sum, tl.zeros
            # see triton.language.core): the original path, whose patching the interpreter never
            # undoes (it drops a device call's scope), so the module stays patched from here on.
            active[-1] |= mine
            return scope
        active.append(mine)
        return _LaunchScope(scope)

    patched._vmambax_fixed = True
    interpreter._patch_lang = patched
