import pytest
import torch


@pytest.fixture
def device():
    """Where the kernel tests run: the GPU when there is one, else the Triton interpreter on CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
