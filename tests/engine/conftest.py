import pytest

import vmambax.utils.tiny  # noqa: F401  registers the "tiny" test model
from vmambax.data import make_synthetic_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_data"))
    make_synthetic_dataset(root, patients=4, size=64, slices=4, seed=1, nifti=True)
    return root
