import copy

import numpy as np
import torch
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from moexport.models import SigmaMoE
from moexport.validate import TorchRunner


def test_running_in_another_dtype_leaves_the_callers_model_as_it_was():
    layer = SigmaMoE(16, 4, 8, 2).train()
    before = copy.deepcopy(layer.state_dict())
    metadata = TensorMetadata().add("x", DataType.FLOAT32, (5, 16))
    x = np.random.default_rng(0).standard_normal((5, 16), dtype=np.float32)
    with TorchRunner(layer, input_metadata=metadata, output_names=["y"], dtype="bfloat16") as runner:
        y = runner.infer({"x": x})["y"]
    expected = copy.deepcopy(layer).eval().bfloat16()(torch.from_numpy(x).bfloat16()).float()
    assert torch.equal(torch.from_numpy(y), expected)  # the runner did run in bfloat16
    assert layer.training
    for name, tensor in layer.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, before[name]), name
