"""The whole model trains on a 2-core CPU fast enough for CPU tests and demos: forward + backward
at batch 2, 128x128, reference backend, under 30 s (the lead's budget)."""
import time

import pytest
import torch

from vmambax.models import VMambaX

BUDGET_S = 30.0


@pytest.mark.slow
def test_forward_backward_batch2_128_under_budget():
    torch.manual_seed(0)
    model = VMambaX(backend="reference").train()
    g = torch.Generator().manual_seed(1)
    ct, pet = torch.randn(2, 1, 128, 128, generator=g), torch.randn(2, 1, 128, 128, generator=g)
    start = time.perf_counter()
    out = model(ct, pet)
    fwd = time.perf_counter() - start
    # stop early rather than spend minutes on a backward that cannot fit any more
    assert fwd < BUDGET_S, f"forward alone took {fwd:.1f} s > {BUDGET_S:.0f} s (backward not run)"
    out.square().mean().backward()
    total = time.perf_counter() - start
    assert model.decode_head.output.weight.grad is not None
    assert total < BUDGET_S, f"forward {fwd:.1f} s + backward {total - fwd:.1f} s = {total:.1f} s > {BUDGET_S:.0f} s"
