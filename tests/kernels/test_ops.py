import pytest
import torch

from moexport import MoexportError
from moexport.core import accel, tolerance_for
from moexport.core.dtypes import dtype_name
from moexport.kernels import sigma_moe_forward
from moexport.kernels.configs import ConfigTable, experts_key, tile_key
from moexport.kernels.host import run_plan
from moexport.kernels.ops import sigma_moe_train
from moexport.kernels.plan import MoEShape, sigma_moe_plan
from moexport.models import SigmaMoE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_layer(dtype=torch.float32, *, k=2, n_experts=6, expert_size=8, selection="sigmoid", activation="relu",
               bias=True, device="cpu"):
    layer = SigmaMoE(24, n_experts, expert_size, k, selection=selection, activation=activation, bias=bias, v_dim=20)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
            layer.o_bias.normal_()
    return layer.to(device, dtype)


def forward(layer, x, **options):
    with torch.no_grad():
        return sigma_moe_forward(x, layer.expert_sel, layer.keys, layer.values, k=layer.k, selection=layer.selection,
                                 activation=layer.activation, bias=layer.bias, o_bias=layer.o_bias, **options)


def assert_close(actual, expected, dtype, what):
    tol = tolerance_for(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol.rtol, atol=tol.atol, msg=what)


# small tiles for make_layer's shapes (d 24, expert_size 32, v_dim 20): several tiles along every dimension
SMALL_TILES = {"BLOCK_G": 16, "BLOCK_D": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}


def experts_configs(config: dict, n_tokens: int) -> dict:
    """A table of configs in which `config` is the experts config of make_layer(expert_size=32) at n_tokens."""
    return {experts_key(24, 6, 32, 20, 2, n_tokens): config}


def planned_forward(layer, x, configs):
    """The inference plan of `layer` for x with `configs` (as `sigma_moe_forward` would plan it), and y of
    that plan run."""
    plan = sigma_moe_plan(MoEShape.of(layer, dtype_name(x.dtype)), x.shape[0], configs=configs)
    with torch.no_grad():
        y = run_plan(plan, {"x": x, "expert_sel": layer.expert_sel, "keys": layer.keys, "values": layer.values,
                            "bias": layer.bias, "o_bias": layer.o_bias})["y"]
    return plan, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("selection, activation", [("sigmoid", "relu"), ("softmax", "gelu"),
                                                   ("softmax_after_topk", "silu")])
@pytest.mark.parametrize("n_tokens", [5, 70], ids=["gather", "grouped"])
def test_inference_matches_the_reference(dtype, selection, activation, n_tokens, device):
    layer = make_layer(dtype, selection=selection, activation=activation, device=device).eval()
    x = torch.randn(n_tokens, 24).to(device, dtype)
    y = forward(layer, x)
    assert y.dtype == dtype and y.shape == (n_tokens, 20)
    assert_close(y, layer.reference_forward(x), dtype, f"y {dtype} {selection} {activation} T={n_tokens}")


@pytest.mark.parametrize("n_tokens", [1, 70])
def test_k_equal_to_n_experts_without_bias(n_tokens, device):
    layer = make_layer(k=4, n_experts=4, bias=False, device=device).eval()
    x = torch.randn(2, n_tokens, 24, device=device)
    assert_close(forward(layer, x), layer.reference_forward(x), torch.float32, "y")


@pytest.mark.parametrize("n_tokens", [5, 70], ids=["gather", "grouped"])
def test_tied_router_rows_route_like_the_reference(n_tokens, device):
    layer = make_layer(device=device).eval()
    with torch.no_grad():
        layer.expert_sel[3] = layer.expert_sel[1]  # experts 1 and 3 always tie: 1 must win
    x = torch.randn(n_tokens, 24, device=device)
    assert_close(forward(layer, x), layer.reference_forward(x), torch.float32, "y")


@pytest.mark.parametrize("selection, activation, bias", [("sigmoid", "relu", False), ("softmax", "gelu", True),
                                                         ("softmax_after_topk", "silu", True)])
def test_training_gradients_match_autograd_on_the_reference(selection, activation, bias, device):
    layer = make_layer(selection=selection, activation=activation, bias=bias, device=device).train()
    x = torch.randn(70, 24, device=device, requires_grad=True)
    wrt = [x, *layer.parameters()]
    y = sigma_moe_train(layer, x)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, wrt, dy)
    y_ref = layer.reference_forward(x)
    ref = torch.autograd.grad(y_ref, wrt, dy)
    assert_close(y, y_ref, torch.float32, "y")
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    for name, g, r in zip(names, grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=f"d{name}")


def test_expert_dropout_drops_the_experts_the_reference_drops(device):
    layer = make_layer(device=device)
    layer.expert_dropout = 0.3
    layer.train()
    x = torch.randn(40, 24, device=device)
    torch.manual_seed(7)
    y = sigma_moe_train(layer, x)
    torch.manual_seed(7)
    assert_close(y, layer.reference_forward(x), torch.float32, "y with expert dropout")


def test_training_forward_feeds_the_entropy_regularizer(device):
    layer = make_layer(device=device).train()
    sigma_moe_train(layer, torch.randn(20, 24, device=device))
    assert torch.isfinite(layer.entropy_regularizer())


def test_training_under_bf16_autocast_routes_on_float32_logits(device):
    layer = make_layer(device=device).train()
    x = torch.randn(20, 24, device=device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        y = sigma_moe_train(layer, x)
    assert layer._last_logits.dtype == torch.float32
    assert_close(y, layer.reference_forward(x), torch.float32, "y under autocast")


def test_bad_layer_inputs_get_one_clear_error():
    layer = make_layer()
    x = torch.randn(5, 24)

    def call(x=x, k=2, **options):
        sigma_moe_forward(x, layer.expert_sel, layer.keys, layer.values, k=k, **options)

    # named by the shape check, or by the plan's once a call of this shape has cached it
    with pytest.raises(MoexportError, match=r"x.*\(5, 23\)"):
        call(torch.randn(5, 23))
    with pytest.raises(MoexportError, match="k=7"):
        call(k=7)
    with pytest.raises(MoexportError, match="selection"):
        call(selection="argmax")
    with pytest.raises(MoexportError, match="activation='tanh'"):
        call(activation="tanh")


def test_fast_path_is_offered_for_cuda_inputs_only():
    import moexport  # noqa: F401 - importing the package registers the kernels

    assert accel.lookup("sigma_moe", torch.zeros(1)) is None
    if torch.cuda.is_available():
        assert accel.lookup("sigma_moe", torch.zeros(1, device="cuda")) is not None


def test_defaults_gather_a_few_hundred_tokens_when_experts_get_few_rows(device):
    """Past GATHER_MAX_TOKENS the defaults still gather where experts get few rows (as the H200's picks
    at 256 tokens do): route -> experts, the experts launched to start during routing."""
    from moexport.kernels import configs, ops

    layer = make_layer(torch.bfloat16, n_experts=16, expert_size=32, device=device).eval()
    x = torch.randn(150, 24).to(device, torch.bfloat16)
    assert 150 > configs.GATHER_MAX_TOKENS
    plan = ops._layer_plan(x, layer.expert_sel, layer.keys, layer.values, layer.bias, 2, "sigmoid", "relu")
    assert plan.notes["mode"] == "gather" and [s.launch_pdl for s in plan.steps] == [False, True]
    assert_close(forward(layer, x), layer.reference_forward(x), torch.bfloat16, "y")


@pytest.mark.parametrize("speculate", [False, True])
@pytest.mark.parametrize("finish", ["inline", "atomic"])
def test_gather_with_and_without_speculation_matches_the_reference(speculate, finish, device):
    """Speculating gather programs compute every token's up projection before reading the routing and
    add only the rows of the tokens that chose their expert: the others must get nothing from it
    (6 experts, k = 2, 9 tokens: every expert misses some tokens, with and without the bias)."""
    # float16: bfloat16 layers never sum by atomics
    layer = make_layer(torch.float16, expert_size=32, device=device).eval()
    x = torch.randn(9, 24).to(device, torch.float16)
    plan, y = planned_forward(layer, x, experts_configs({"mode": "gather", "BLOCK_M": 16, **SMALL_TILES,
                                                         "finish": finish, "speculate": speculate}, 9))
    assert plan.steps[-1].constexprs["SPECULATE"] == speculate and plan.notes["finish"] == finish
    assert_close(y, layer.reference_forward(x), torch.float16, f"y speculate={speculate}")


SEQUENCES = [(mode, finish) for mode in ("gather", "fused", "split") for finish in ("inline", "pass", "atomic")]


@pytest.mark.parametrize("mode, finish, dtype, bias",
                         [(m, f, dt, b) for m, f in SEQUENCES
                          for dt, b in [(torch.bfloat16, True), (torch.float16, False)]]
                         + [(m, "inline", torch.float32, True) for m in ("gather", "fused", "split")])
@pytest.mark.parametrize("n_tokens", [9, 150])
def test_every_experts_sequence_matches_the_reference(mode, finish, dtype, bias, n_tokens, device, monkeypatch):
    """Each sequence and summation `configs.experts_config` can pick, with several hidden chunks per
    expert and several column blocks: every token row must get each of its contributions once and
    be rounded once, by its last contributor (inline) or by the finalize pass after a memset (pass),
    or take every add in its own dtype (atomic; float32 layers always, bfloat16 layers never: their
    atomics round too coarsely). The gather sequence with several row blocks per expert and several scan
    steps per block (150 tokens)."""
    from moexport.kernels import plan as plans

    layer = make_layer(dtype, expert_size=32, bias=bias, device=device).eval()
    # two spans of output columns per row block (V_SPLIT): 16 and the last 4 of v_dim 20
    configs = experts_configs({"mode": mode, "BLOCK_M": 16 if mode == "gather" else 32, **SMALL_TILES,
                               "finish": finish, "V_SPLIT": 2}, n_tokens)
    # the split sequence's down projection in two column tiles, each rounded by its own last contributor
    configs[tile_key("down", 32, 20, n_tokens)] = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4,
                                                   "num_stages": 2}
    monkeypatch.setattr(plans, "GATHER_SCAN", 64)
    x = torch.randn(n_tokens, 24).to(device, dtype)
    plan, y = planned_forward(layer, x, configs)
    want = "atomic" if dtype == torch.float32 else "inline" if (dtype, finish) == (torch.bfloat16, "atomic") else finish
    assert plan.notes["finish"] == want
    assert_close(y, layer.reference_forward(x), dtype, f"y {mode} {finish} {dtype}")


FENCE = 1 << 12  # canary bytes on each side of every buffer a plan writes


def run_fenced(plan, inputs: dict) -> tuple[dict, list[str]]:
    """Run `plan` as `host.run_plan` does (on the inputs' device: the interpreter on the CPU, compiled
    kernels on a GPU), with each output and the workspace inside a slab of canary bytes; returns the
    outputs and the buffers whose canaries changed (written out of bounds, which on a GPU corrupts
    whatever lies there: ONNX Runtime's or TensorRT's tensors)."""
    from math import prod

    from moexport.kernels.host import _Prepared, launch_jit

    prepared = _Prepared(plan, {n: tuple(t.shape) for n, t in inputs.items() if t is not None})
    slabs, buffers = {}, dict(inputs)
    device = inputs["x"].device

    def fenced(name, nbytes):
        slabs[name] = torch.full((nbytes + 2 * FENCE,), 0xA5, dtype=torch.uint8, device=device)
        return slabs[name][FENCE:FENCE + nbytes]

    for name, shape, dtype, zero in prepared.outputs:
        buffers[name] = fenced(name, prod(shape) * dtype.itemsize).view(dtype).view(shape)
        if zero:
            buffers[name].zero_()
    launch_jit(prepared, buffers, fenced("workspace", prepared.workspace_bytes))
    spoiled = [n for n, slab in slabs.items() if bool((slab[:FENCE] != 0xA5).any() | (slab[-FENCE:] != 0xA5).any())]
    return {name: buffers[name] for name, *_ in prepared.outputs}, spoiled


@pytest.mark.parametrize("mode, finish", SEQUENCES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_every_sequence_writes_only_its_own_buffers(mode, finish, dtype, device, monkeypatch):
    """Each sequence, with the experts output the ONNX op has, stays inside its outputs and workspace
    (a fused float32 LM faulted on ONNX Runtime's CUDA provider; this rules out the plans' indexing),
    and still matches the reference."""
    from moexport.kernels import plan as plans

    monkeypatch.setattr(plans, "GATHER_SCAN", 64)
    layer = make_layer(dtype, expert_size=32, device=device)
    configs = experts_configs({"mode": mode, "BLOCK_M": 16 if mode == "gather" else 32, **SMALL_TILES,
                               "finish": finish, "V_SPLIT": 2}, 150)
    x = torch.randn(150, 24).to(device, dtype)
    plan = sigma_moe_plan(MoEShape.of(layer, dtype_name(dtype)), 150, configs=configs, expert_output=True)
    with torch.no_grad():
        out, spoiled = run_fenced(plan, {"x": x, "expert_sel": layer.expert_sel, "keys": layer.keys,
                                         "values": layer.values, "bias": layer.bias, "o_bias": layer.o_bias})
    assert not spoiled, f"{mode} {finish}: written out of bounds around {spoiled}"
    assert_close(out["y"], layer.reference_forward(x), dtype, f"y {mode} {finish} {dtype}")


@pytest.mark.parametrize("speculate", [False, True])
def test_values_of_units_no_added_row_activates_are_not_read(speculate, device):
    """ReLU units that are zero for every token a gather program adds contribute nothing, and the
    program does not read their rows of values: here those rows hold NaN, which any read would carry
    into y (0 * NaN), and y must equal the reference's with the rows zeroed."""
    layer = make_layer(torch.bfloat16, expert_size=32, device=device).eval()
    dead = torch.arange(32) % 3 == 0
    with torch.no_grad():
        layer.bias[:, dead] = -1e4  # far below any x @ keys here: these units never fire
        layer.values[:, dead] = 0.0
    expected = layer.reference_forward(x := torch.randn(9, 24).to(device, torch.bfloat16))
    with torch.no_grad():
        layer.values[:, dead] = float("nan")
    _, y = planned_forward(layer, x, experts_configs({"mode": "gather", "BLOCK_M": 16, **SMALL_TILES,
                                                      "finish": "inline", "speculate": speculate}, 9))
    assert torch.isfinite(y).all(), "a dead unit's row of values was read"
    assert_close(y, expected, torch.bfloat16, f"y speculate={speculate}")


def test_forward_plans_with_the_configs_it_is_given(device, monkeypatch):
    """`configs=` (how the benchmark and the tuning harness try configs) plans the call with that table,
    one plan per equal table, beside the shipped table's plan (150 tokens, 6 experts: fused by default)."""
    from moexport.kernels import ops

    layer = make_layer(torch.bfloat16, expert_size=32, device=device).eval()
    x = torch.randn(150, 24).to(device, torch.bfloat16)
    gather = {"mode": "gather", "BLOCK_M": 16, **SMALL_TILES, "finish": "inline"}
    configs = ConfigTable(experts_configs(gather, 150))
    ran = []
    monkeypatch.setattr(ops, "run_plan", lambda plan, tensors: ran.append(plan) or run_plan(plan, tensors))
    y = forward(layer, x, configs=configs)
    args = (x, layer.expert_sel, layer.keys, layer.values, layer.bias, 2, "sigmoid", "relu")
    assert len(ran) == 1 and ran[0] is ops._layer_plan(*args, ConfigTable(configs))
    assert ran[0].notes["mode"] == "gather" and ran[0].notes["finish"] == "inline"
    assert ops._layer_plan(*args).notes["mode"] == "fused"
    assert_close(y, layer.reference_forward(x), torch.bfloat16, "y")


def test_configs_are_refused_where_the_custom_op_runs():
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    layer = make_layer().eval()
    with PassThrough(), pytest.raises(MoexportError, match="plain eager calls only"):
        forward(layer, torch.randn(5, 24), configs=experts_configs({"mode": "gather"}, 5))
