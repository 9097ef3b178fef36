"""Shared fixtures: the published model's key layout and the golden outputs (tests/assets, made by
running the published implementation; see the fixtures README in the shared project notes)."""
import math
import pathlib
import zlib

import pytest
import torch

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
SEED = 11


def published_keys():
    """[(key, shape, kind)] of the published model's 852 state-dict entries."""
    rows = []
    for line in (ASSETS / "published_state_dict_keys.tsv").read_text().splitlines():
        key, shape, _, kind = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        rows.append((key, dims, kind))
    return rows


def published_tensor(key: str, shape: tuple, s: int = SEED) -> torch.Tensor:
    """The fixture weight rule: every tensor is a function of its key and shape."""
    g = torch.Generator().manual_seed((zlib.crc32(key.encode()) ^ (s * 2654435761)) & 0x7FFFFFFF)

    def rand():
        return torch.rand(shape, generator=g)

    def randn():
        return torch.randn(shape, generator=g)

    if key.endswith("num_batches_tracked"):
        return torch.tensor(10)
    if key.endswith("A_logs"):
        return torch.log(torch.arange(1, shape[-1] + 1, dtype=torch.float32)).expand(shape) + 0.1 * (rand() - 0.5)
    if key.endswith(".Ds"):
        return 1 + 0.1 * randn()
    if key.endswith("dt_projs_bias"):
        dt = torch.exp(rand() * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        return dt + torch.log(-torch.expm1(-dt))
    if key.endswith("dt_projs_weight"):
        return (rand() * 2 - 1) * shape[-1] ** -0.5
    if key.endswith("running_var"):
        return 0.5 + rand()
    if key.endswith("running_mean"):
        return 0.1 * randn()
    if key.endswith("x_proj_weight"):
        return randn() / math.sqrt(shape[-1])
    if len(shape) == 1:
        return 0.02 * randn() if key.endswith("bias") else 1 + 0.1 * randn()
    return randn() / math.sqrt(math.prod(shape[1:]))


@pytest.fixture(scope="session")
def published_state_dict():
    return {k: published_tensor(k, shape) for k, shape, _ in published_keys()}


@pytest.fixture(scope="session")
def golden():
    return torch.load(ASSETS / "published_128x128_seed11.pt", weights_only=True)
