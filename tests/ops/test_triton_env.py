"""The CPU interpreter's patches (vmambax_kernels._triton_env.patch_interpreter): same results,
the language restored after each launch, and @jit helpers called inside a kernel no longer redo
the launch's patching of triton.language."""
import inspect

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402  (the interpreter finds the language in a kernel's globals)

from vmambax_kernels._triton_env import interpreting, patch_interpreter  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreting(), reason="the patches apply under TRITON_INTERPRET=1 only")
CALLS = 6


@triton.jit
def _twice_sum(x):
    return tl.sum(x * 2.0, axis=0)   # Triton's own @jit helper (tl.sum) inside ours


@triton.jit
def _helpers_kernel(x_ptr, y_ptr, n, CALLS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    acc = tl.zeros([1], dtype=tl.float32)
    for _ in tl.static_range(CALLS):
        acc += _twice_sum(x)
    tl.store(y_ptr + tl.arange(0, 1), acc)


def test_helper_calls_keep_results_and_skip_the_patching(monkeypatch):
    patch_interpreter()
    walks = []
    real = inspect.getmembers

    def counted(*args, **kwargs):
        walks.append(args[0])
        return real(*args, **kwargs)

    x = torch.randn(13)
    expected = CALLS * 2.0 * x.sum()
    for _ in range(2):   # a second launch after the first restored the language
        y = torch.zeros(1)
        walks.clear()
        monkeypatch.setattr(inspect, "getmembers", counted)
        _helpers_kernel[(1,)](x, y, x.numel(), CALLS=CALLS, BLOCK=16)
        monkeypatch.setattr(inspect, "getmembers", real)
        torch.testing.assert_close(y[0], expected)
        # The launch walks triton.language (4 getmembers) and the first tl.sum it and its core
        # module (6); unpatched, every helper call walked 4 or 6 again (67 here)
        assert len(walks) <= 10, f"{len(walks)} getmembers walks for one launch"
        assert tl.core.is_builtin(tl.load), "the launch left triton.language patched"
