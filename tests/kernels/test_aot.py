import json

import pytest
import torch

from moexport.core import tolerance_for
from moexport.kernels import compile_plan
from moexport.kernels.configs import experts_config, experts_key
from moexport.kernels.launcher import symbols_of, workspace_layout
from moexport.kernels.ops import sigma_moe_forward
from moexport.kernels.plan import MoEShape, evaluate, sigma_moe_plan

# float16, whose plans may sum by atomics in the model dtype (bfloat16 layers never do)
SHAPE = MoEShape(64, 8, 32, 64, 2, "float16", "sigmoid", "relu", True)
# cubins against the JIT, which may sum in another order (float32 or float16 atomics): the float16 tolerance
TOL = tolerance_for(torch.float16)


def carried_plans() -> dict:
    """name -> plan of the manifests the H200 script carries (MOEXPORT_AOT_DIR), compiled on this CPU
    machine by `python tests/kernels/test_aot.py .carry/aot`: the gather plan, the dispatched plan
    rounded inline, with a memset and a finalize pass, and with float16 atomics into y."""
    plans = {"moe_16": sigma_moe_plan(SHAPE, 16)}
    layer = (SHAPE.d, SHAPE.n_experts, SHAPE.expert_size, SHAPE.v_dim, SHAPE.k, 4096)
    for finish in ("inline", "pass", "atomic"):
        configs = {experts_key(*layer): dict(experts_config(*layer), finish=finish)}
        plans[f"moe_4096_{finish}"] = sigma_moe_plan(SHAPE, 4096, configs=configs)
    return plans


@pytest.mark.parametrize("sm", [80, 90, 86])
def test_float32_kernels_fit_the_shared_memory_of_the_gpu_they_are_compiled_for(sm, tmp_path):
    """The shipped WT103-big config at 4096 tokens (4 stages of 128 x 128 x 64 tiles) needed 256 KB in
    float32, beyond sm_90's 227 KB: its plan takes fewer stages, and where an architecture offers less
    still (sm_86: 99 KB) the compiler takes fewer again."""
    from moexport.kernels.aot import SHARED_OPT_IN

    plan = sigma_moe_plan(MoEShape(1024, 32, 128, 1024, 4, "float32"), 4096)
    manifest = json.loads(compile_plan(plan, tmp_path, sm=sm).read_text())
    assert [s["kernel"] for s in manifest["steps"]] == [s.kernel for s in plan.steps]
    assert all(s["shared"] <= SHARED_OPT_IN[sm] for s in manifest["steps"]), manifest["steps"]


def _local_memory_bytes(cubin) -> int:
    """Stack bytes a thread of the cubin's kernel takes (ptxas' spills land there), by the cuobjdump that
    Triton ships."""
    import os
    import re
    import subprocess

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True)
    return int(re.search(r"STACK:(\d+)", usage.stdout)[1])


@pytest.mark.parametrize("d, E, G, k, n_tokens", [(412, 16, 128, 4, 1), (412, 16, 128, 4, 1024), (128, 16, 32, 4, 128),
                                                  (2048, 64, 256, 8, 256), (412, 16, 128, 4, 4096)])
def test_float32_route_and_expert_kernels_keep_their_tiles_in_registers(d, E, G, k, n_tokens, tmp_path):
    """Float32 products split their operand tiles in registers (3 tf32 passes); with the half-precision
    tiles the gather kernel of WT103-small at one token spilled 5.4 KB a thread (7x slower on an H100),
    and the fused LM's at 128 tokens 184 bytes; with Triton 3.6 (the GPU machines'), through their hidden
    tiles, the large shape's at 256 tokens 240 bytes and WT103-small's dispatched one at 4096 tokens 176.
    Its plans take shorter tiles in float32: no spills."""
    plan = sigma_moe_plan(MoEShape(d, E, G, d, k, "float32"), n_tokens)
    manifest = json.loads(compile_plan(plan, tmp_path, sm=90).read_text())
    for step in manifest["steps"]:
        if step["kernel"] in ("routing.route_kernel", "experts.experts_kernel"):
            assert _local_memory_bytes(tmp_path / step["cubin"]) == 0, (step["kernel"], step["constexprs"])


def test_expressions_cover_the_plan_language():
    assert evaluate("cdiv(N, 64) * 3 + min(N, 5) - max(1, N // 2)", {"N": 100}) == 2 * 3 + 5 - 50
    assert evaluate(7, {}) == 7


@pytest.mark.parametrize("name", ["moe_16", "moe_4096_inline", "moe_4096_pass", "moe_4096_atomic"])
def test_compile_plan_writes_cubins_and_launch_metadata_without_a_gpu(tmp_path, name):
    plan = carried_plans()[name]
    path = compile_plan(plan, tmp_path, sm=90, name=name)
    manifest = json.loads(path.read_text())
    assert manifest["sm"] == 90 and len(manifest["steps"]) == len(plan.steps)
    # summing: in the expert kernel (buffers prepared by the route kernel), or a memset and a last pass
    zeroed = [b["name"] for b in manifest["workspace"] if b["zero"]]
    last = manifest["steps"][-1]["kernel"]
    if name.endswith("pass"):
        assert zeroed == ["acc"] and last == "grouped.finalize_kernel"
    else:
        assert zeroed == [] and last == "experts.experts_kernel"
    # atomic: no float32 accumulator at all, the expert kernel adds float16 into y
    assert ("acc" in [b["name"] for b in manifest["workspace"]]) == (not name.endswith("atomic"))
    for step in manifest["steps"]:
        cubin = (tmp_path / step["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF", step["cubin"]
        ptx = (tmp_path / step["ptx"]).read_text()
        assert ".version 8.4" in ptx and f".entry {step['entry']}(" in ptx
        # the argument layout is the PTX entry's parameter list minus the two hidden scratch pointers
        n_params = ptx.split(f".entry {step['entry']}(")[1].split(")")[0].count(".param")
        assert n_params == len(step["args"]) + step["hidden_pointers"] and step["hidden_pointers"] == 2
        assert step["block"][0] % 32 == 0 and step["shared"] >= 0
        # the gather experts kernel starts during routing (programmatic dependent launch) and waits in
        # its code; the route kernel lets it; kernels after a dispatch launch normally
        pdl = step["kernel"] == "experts.experts_kernel" and name == "moe_16"
        assert step["launch_pdl"] == pdl
        assert ("griddepcontrol.wait" in ptx) == (step["kernel"] == "experts.experts_kernel")
        assert ("griddepcontrol.launch_dependents" in ptx) == (step["kernel"] == "routing.route_kernel")
    symbols = symbols_of(manifest, {"x": (1000, 64)})
    layout, total = workspace_layout(manifest, symbols)
    assert all(offset % 256 == 0 for offset, _ in layout.values()) and total >= sum(n for _, n in layout.values())


@pytest.mark.gpu
@pytest.mark.parametrize("name, n_tokens", [("moe_16", 7), ("moe_4096_inline", 3000), ("moe_4096_pass", 3000),
                                             ("moe_4096_atomic", 3000)])
def test_aot_cubins_run_through_the_driver_like_the_jit(tmp_path, name, n_tokens):
    from moexport.kernels.launcher import AOTRunner

    torch.manual_seed(1)
    tensors = {"x": torch.randn(n_tokens, 64), "expert_sel": torch.randn(8, 64), "keys": torch.randn(8, 64, 32) / 8,
               "values": torch.randn(8, 32, 64) / 6, "bias": torch.randn(8, 32), "o_bias": torch.randn(64)}
    tensors = {n: t.to("cuda", torch.float16) for n, t in tensors.items()}
    runner = AOTRunner(compile_plan(carried_plans()[name], tmp_path, sm=90))
    y = runner.run(tensors)["y"]
    jit = sigma_moe_forward(tensors["x"], tensors["expert_sel"], tensors["keys"], tensors["values"], k=2,
                            bias=tensors["bias"], o_bias=tensors["o_bias"])
    torch.cuda.synchronize()
    torch.testing.assert_close(y.float(), jit.float(), rtol=TOL.rtol, atol=TOL.atol)


@pytest.mark.gpu
def test_cubins_compiled_on_a_cpu_machine_run_here():
    """MOEXPORT_AOT_DIR: the manifests of `carried_plans`, compiled on the CPU machine with pip Triton
    (set by the H200 script, which carries them); without it there is nothing to load."""
    import os
    from pathlib import Path

    from moexport.kernels.launcher import AOTRunner

    folder = os.environ.get("MOEXPORT_AOT_DIR")
    if not folder:
        pytest.skip("MOEXPORT_AOT_DIR not set: no cubins from another machine to load")
    for name, n_tokens in (("moe_16", 11), ("moe_4096_inline", 2500), ("moe_4096_pass", 2500),
                           ("moe_4096_atomic", 2500)):
        runner = AOTRunner(Path(folder) / f"{name}.json")
        tensors = {"x": torch.randn(n_tokens, 64), "expert_sel": torch.randn(8, 64),
                   "keys": torch.randn(8, 64, 32) / 8, "values": torch.randn(8, 32, 64) / 6,
                   "bias": torch.randn(8, 32), "o_bias": torch.randn(64)}
        tensors = {n: t.to("cuda", torch.float16) for n, t in tensors.items()}
        y = runner.run(tensors)["y"]
        jit = sigma_moe_forward(tensors["x"], tensors["expert_sel"], tensors["keys"], tensors["values"], k=2,
                                bias=tensors["bias"], o_bias=tensors["o_bias"])
        torch.testing.assert_close(y.float(), jit.float(), rtol=TOL.rtol, atol=TOL.atol, msg=name)


if __name__ == "__main__":  # compile the carried manifests: python tests/kernels/test_aot.py OUT_DIR
    import sys

    for plan_name, plan in carried_plans().items():
        print(compile_plan(plan, sys.argv[1], sm=90, name=plan_name))


def test_compiled_relu_keeps_nan(tmp_path):
    """PTX's max.f32 returns the operand that is not NaN: ReLU(NaN) was 0 on the GPU (NaN in the
    reference and the interpreter), so a NaN token's output came out finite (found by tools/sweep.py)."""
    relu = MoEShape(64, 8, 32, 64, 2, "float16", "sigmoid", "relu", True)
    path = compile_plan(sigma_moe_plan(relu, 16), tmp_path, sm=90, name="relu")
    step = next(s for s in json.loads(path.read_text())["steps"] if s["kernel"] == "experts.experts_kernel")
    ptx = (tmp_path / step["ptx"]).read_text()
    assert "max.NaN.f32" in ptx and "max.f32" not in ptx


@pytest.mark.gpu
def test_aot_runner_takes_zero_tokens(tmp_path):
    """No launch and no memset for an empty call, as the native launcher (the gather plan's experts grid
    does not depend on the token count)."""
    from moexport.kernels.launcher import AOTRunner

    runner = AOTRunner(compile_plan(carried_plans()["moe_4096_pass"], tmp_path, sm=90))
    tensors = {"x": torch.empty(0, 64), "expert_sel": torch.randn(8, 64), "keys": torch.randn(8, 64, 32),
               "values": torch.randn(8, 32, 64), "bias": torch.randn(8, 32), "o_bias": torch.randn(64)}
    y = runner.run({n: t.to("cuda", torch.float16) for n, t in tensors.items()})["y"]
    torch.cuda.synchronize()
    assert y.shape == (0, 64)
