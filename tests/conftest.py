import os

import numpy as np
import pytest
import torch

# Triton kernels run in the interpreter where there is no GPU; the variable must be set before
# any kernel module is imported (the @triton.jit decorator reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the H200 (see README, 'What runs where')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _bundle_cache(tmp_path_factory):
    """Kernel bundles the tests build are cached in the run's temporary root, which pytest-xdist's
    workers share (one compiles a configuration, the others read it), not in the user's cache;
    unless MOEXPORT_CACHE_DIR names a folder (several runs at once on the GPU machine share one)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    os.environ.setdefault("MOEXPORT_CACHE_DIR", str(root / "moexport-bundles"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tmp_out(tmp_path):
    """A fresh folder for files a test writes."""
    return tmp_path


@pytest.fixture
def rng():
    """A seeded NumPy generator."""
    return np.random.default_rng(0)
