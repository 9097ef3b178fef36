import importlib.util

import pytest

from vmambax.engine import train as train_mod

import vmambax.utils.tiny  # noqa: F401  registers the "tiny" test model
from vmambax.data import make_synthetic_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_data"))
    # The NIfTI copies (for the prediction tests) only where nibabel is installed: the GPU machine's
    # stack lacks it, and its engine tests need only the PNG pairs.
    nifti = importlib.util.find_spec("nibabel") is not None
    make_synthetic_dataset(root, patients=4, size=64, slices=4, seed=1, nifti=nifti)
    return root


@pytest.fixture
def cut_in_epoch_2(monkeypatch):
    """A kill after epoch 2's steps, before its checkpoint (validation of epoch 2 raises
    KeyboardInterrupt); call the returned function to let later runs validate again."""
    real_validate, calls = train_mod.validate, {"n": 0}

    def dies_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_validate(*a, **k)

    monkeypatch.setattr(train_mod, "validate", dies_in_epoch_2)
    return lambda: monkeypatch.setattr(train_mod, "validate", real_validate)
