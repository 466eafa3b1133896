"""Graphs with compiled kernels that the TensorRT plugin tests share, each built once per process."""
import pytest
from trt_cases import sigma_moe_graph


@pytest.fixture(scope="session")
def fused_layer(tmp_path_factory):
    """One fused σ-MoE layer x [batch, seq, 32] -> y.0, experts.0, with its kernels."""
    return sigma_moe_graph(tmp_path_factory.mktemp("layer") / "layer.onnx")


@pytest.fixture(scope="session")
def two_layers(tmp_path_factory):
    """Two fused σ-MoE layers of one configuration in a row: one bundle, shared."""
    return sigma_moe_graph(tmp_path_factory.mktemp("layers") / "layers.onnx", layers=2)
