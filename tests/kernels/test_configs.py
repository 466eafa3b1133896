import importlib.resources
import subprocess
import sys

import pytest

from moexport import MoexportError
from moexport.kernels.configs import ConfigTable, experts_config, experts_key, shipped, tile_config, tile_key

GATHER = {"mode": "gather", "BLOCK_M": 16, "BLOCK_G": 32, "BLOCK_D": 128, "BLOCK_N": 128, "num_warps": 4,
          "num_stages": 3, "finish": "atomic", "route": {"BLOCK_N": 16, "BLOCK_D": 256, "num_warps": 4,
                                                         "num_stages": 3}}


def test_importing_the_kernels_reads_no_config_file():
    code = ("import moexport.kernels, moexport.kernels.plan; from moexport.kernels import configs; "
            "print(configs.shipped.cache_info().misses)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_configs_json_is_the_shipped_table_in_its_own_json_form():
    """Written as `to_json` writes it (one entry a line): merging picks into it changes their lines only."""
    text = (importlib.resources.files("moexport.kernels") / "configs.json").read_text()
    assert shipped().to_json() == text and len(text.splitlines()) == len(shipped()) + 2
    assert all(key[0] == "experts" and len(key) == 7 for key in shipped())


def test_a_table_reads_back_what_it_writes_and_keeps_its_configs_to_itself():
    table = ConfigTable({experts_key(24, 6, 32, 20, 2, 9): GATHER})
    again = ConfigTable.from_json(table.to_json())
    assert again == table and hash(again) == hash(table) and list(again) == [("experts", 24, 6, 32, 20, 2, 16)]
    table[("experts", 24, 6, 32, 20, 2, 16)]["route"]["BLOCK_N"] = 64
    assert table == again, "a config handed out was changed in the table"


def test_merged_replaces_configs_of_the_same_key_and_appends_new_keys():
    a, b, c = (experts_key(24, 6, 32, 20, 2, n) for n in (1, 16, 256))
    table = ConfigTable({a: {"mode": "gather"}, b: {"mode": "gather"}})
    merged = table.merged({b: {"mode": "fused"}, c: {"mode": "split"}})
    assert list(merged) == [a, b, c] and merged[b] == {"mode": "fused"} and table[b] == {"mode": "gather"}


ENTRY = '{"key": ["up", 1, 2, 16], "config": {}}'


@pytest.mark.parametrize("text, problem", [
    ("{", "is not JSON"),
    (ENTRY, "is not a table of configs"),
    ('[{"key": ["up", 1, 2, 16]}]', "is not a table of configs"),
    (f"[{ENTRY}, {ENTRY}]", "holds the key \\['up', 1, 2, 16\\] more than once"),
])
def test_a_text_that_is_not_a_table_of_configs_is_named_with_the_problem(text, problem):
    with pytest.raises(MoexportError, match=f"picks.json \\| {problem}(.|\\n)*Note: .*configs.json"):
        ConfigTable.from_json(text, "picks.json")


def test_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(MoexportError, match="cannot be read"):
        ConfigTable.load(tmp_path / "picks.json")


def test_configs_come_from_the_given_table_else_from_the_defaults():
    shipped_key = next(iter(shipped()))
    layer = shipped_key[1:6]
    assert experts_config(*layer, shipped_key[6]) == shipped()[shipped_key]
    default = experts_config(*layer, shipped_key[6], configs=ConfigTable())
    assert default != shipped()[shipped_key]
    assert experts_config(24, 6, 32, 20, 2, 16, configs={experts_key(24, 6, 32, 20, 2, 16): GATHER}) == GATHER
    tile = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    configs = {tile_key("down", 32, 20, 150): tile}
    assert tile_config("down", 32, 20, 150, rows_per_expert=50, configs=configs) == tile
    assert tile_config("down", 32, 20, 150, rows_per_expert=50)["BLOCK_M"] == 64
