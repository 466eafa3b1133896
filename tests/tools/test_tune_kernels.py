"""The tuning harness's host-side parts (the sweeps themselves need the GPU)."""
import pytest
from tune_kernels import MAX_ERR, NOISE, candidates, main, pick, picks, ship, tuned_key

from moexport.kernels.configs import ConfigTable, shipped


def test_pick_bounds_the_error_and_gives_timing_noise_to_the_more_accurate_config():
    fast_but_rough = {"config": "a", "ms": 1.0, "graph_ms": 1.0, "max_err": MAX_ERR * 1.5}
    fastest_ok = {"config": "b", "ms": 2.0, "graph_ms": 2.0, "max_err": MAX_ERR * 0.9}
    near = 2.0 * NOISE * 0.999
    within_noise = {"config": "c", "ms": near, "graph_ms": near, "max_err": MAX_ERR * 0.4}
    slower = {"config": "d", "ms": 2.5, "graph_ms": 2.5, "max_err": MAX_ERR * 0.1}
    assert pick([fast_but_rough, fastest_ok, within_noise, slower], 256)["config"] == "c"
    assert pick([fast_but_rough, fastest_ok, slower], 256)["config"] == "b"
    assert pick([fast_but_rough], 256) is None
    # up to 1024 tokens the GPU time decides (eager may be host-bound), beyond the eager time
    host_bound = {"config": "e", "ms": 9.0, "graph_ms": 1.5, "max_err": 0.0}
    assert pick([fastest_ok, host_bound], 256)["config"] == "e"
    assert pick([fastest_ok, host_bound], 4096)["config"] == "b"


@pytest.mark.parametrize("T", [1, 16, 256, 4096, 32768])
def test_candidates_start_with_the_shipped_config_and_differ_from_each_other(T):
    for sequences in (False, True):
        found = candidates("WT103-big", T, sequences=sequences)
        assert found[0] == shipped()[tuned_key("WT103-big", T)]
        assert all(a != b for i, a in enumerate(found) for b in found[:i])


def test_candidates_vary_the_configs_they_are_given():
    gather = {"mode": "gather", "BLOCK_M": 16, "BLOCK_G": 32, "BLOCK_D": 128, "BLOCK_N": 128, "num_warps": 4,
              "num_stages": 3, "finish": "inline"}
    found = candidates("WT103-big", 16, configs=ConfigTable({tuned_key("WT103-big", 16): gather}))
    assert found[0] == gather and dict(gather, speculate=True) in found


def test_picks_are_a_table_in_the_shipped_format_that_ships_by_merging(tmp_path):
    """A sweep's picks (its cells' best configs, none where nothing met the error bound) merge into a copy
    of configs.json: the picked keys replaced or added, every other entry and the order kept."""
    shipped_key, new_key = tuned_key("large", 16), tuned_key("large", 64)
    pick_config = dict(shipped()[shipped_key], num_stages=2)
    cells = [{"key": list(shipped_key), "best": pick_config}, {"key": list(new_key), "best": {"mode": "split"}},
             {"key": list(tuned_key("large", 256)), "best": None}]
    (tmp_path / "picks.json").write_text(picks(cells).to_json())
    (tmp_path / "configs.json").write_text(shipped().to_json())

    said = ship(tmp_path / "picks.json", tmp_path / "configs.json")
    assert [line.split(":")[0] for line in said] == ["replaced", "added"]
    merged = ConfigTable.load(tmp_path / "configs.json")
    assert merged[shipped_key] == pick_config and merged[new_key] == {"mode": "split"}
    assert list(merged) == [*shipped(), new_key]
    assert all(merged[key] == shipped()[key] for key in shipped() if key != shipped_key)


def test_the_sweep_needs_a_gpu_and_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the sweep would run")
    from moexport import MoexportError

    with pytest.raises(MoexportError, match="needs a CUDA GPU"):
        main(["--tokens", "16"])
