import pytest

from ds_upcycle.errors import UserError
from ds_upcycle.upcycle.config import ExpandConfig


def cfg(**kw):
    return ExpandConfig(source="a", destination="b", **{"multiplier": 2, **kw})


def test_target_experts_and_layout():
    assert cfg().target_experts(4) == 8
    assert cfg(multiplier=None, num_experts=6).target_experts(4) == 6
    assert cfg(multiplier=1).target_experts(4) == 4  # reshard
    assert cfg().target_layout(2, 2, 8) == (2, 2)
    assert cfg(world_size=4, ep_size=4).target_layout(2, 1, 8) == (4, 4)


@pytest.mark.parametrize("kw,message", [
    ({"num_experts": 8}, "exactly one of"),
    ({"multiplier": None}, "exactly one of"),
    ({"multiplier": 0}, ">= 1"),
    ({"select": "best"}, "--select"),
    ({"optimizer_state": "keep"}, "--optimizer-state"),
    ({"router_noise": -1.0}, "router-noise"),
    ({"ep_size": 0}, "--ep-size"),
    ({"split_copies": True}, "--split-copies needs --distinct-copies"),
    ({"split_copies": True, "distinct_copies": True, "split_scale": 0.0}, "--split-scale must be > 0"),
])
def test_bad_options(kw, message):
    with pytest.raises(UserError, match=message):
        cfg(**kw)


def test_bad_targets():
    with pytest.raises(UserError, match="must be larger"):
        cfg(multiplier=None, num_experts=4).target_experts(4)
    with pytest.raises(UserError, match="must be larger"):
        cfg(multiplier=None, num_experts=3).target_experts(4)
    with pytest.raises(UserError, match="num_experts 6 is not divisible by --ep-size 4"):
        cfg(multiplier=None, num_experts=6, ep_size=4, world_size=4).target_layout(2, 2, 6)
    with pytest.raises(UserError, match="--world-size 3 is not divisible by the source's ep_size"):
        cfg(world_size=3).target_layout(2, 2, 8)


def test_split_copies_measures_on_the_calibration_data_or_the_source():
    assert cfg(split_copies=True, distinct_copies=True).split_data == "source"
    split = cfg(split_copies=True, distinct_copies=True, select="uniform", calibration_data="x.txt")
    assert split.split_data == "x.txt" and not split.uses_gradients  # uniform: the data only sets the split
    assert cfg(calibration_data="x.txt").uses_gradients
