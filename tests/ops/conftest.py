"""Fixtures shared by the op tests: a Triton backend's launch-configuration override, and true-fp32
references on the GPU."""
import pytest
import torch


@pytest.fixture
def config(request):
    """The launch-configuration override of one test (its indirect parameter, none without one),
    set in the test module's CONFIG_OVERRIDE (its backend's) and cleared after the test, so that
    every other test runs on the defaults."""
    override = request.module.CONFIG_OVERRIDE
    override.update(getattr(request, "param", {}))
    yield
    override.clear()


@pytest.fixture
def exact_cuda_refs():
    """ref32 on the GPU must be true fp32: cuDNN and cuBLAS would otherwise use TF32 for convs and
    matmuls. Restored after the test."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
