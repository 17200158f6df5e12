import pytest

from ds_upcycle.config import ModelConfig, get_preset, parse_overrides, resolve_model_config
from ds_upcycle.errors import UserError


def test_overrides_are_typed():
    cfg = resolve_model_config("tiny", ["num_experts=8", "aux_loss_coef=0.01", "tie_embeddings=true",
                                        "score_func=softmax", "route_norm=auto"])
    assert cfg.num_experts == 8 and cfg.aux_loss_coef == 0.01 and cfg.tie_embeddings is True
    assert cfg.score_func == "softmax" and cfg.route_norm is None
    assert get_preset("tiny").num_experts == 4  # presets are not modified


@pytest.mark.parametrize("bad,message", [
    (["num_expert=8"], "did you mean 'num_experts'"),
    (["top_k"], "field=value"),
    (["top_k=two"], "cannot read"),
    (["top_k=9"], "exceeds num_experts"),
    (["n_kv_heads=3"], "not divisible"),
    (["score_func=relu"], "score_func"),
    (["route_groups=0,0,1,1"], "cannot read"),  # expand sets groups; --set can only clear them
])
def test_bad_overrides(bad, message):
    with pytest.raises(UserError, match=message):
        resolve_model_config("tiny", bad)


def test_optional_fields_clear_with_none():
    assert parse_overrides(["route_groups=none", "layer_experts=None"]) == {"route_groups": None, "layer_experts": None}


def test_unknown_preset_suggests():
    with pytest.raises(UserError, match="did you mean 'tiny'"):
        get_preset("tinny")


def test_round_trip_dict():
    cfg = resolve_model_config("small", ["num_experts=16"])
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="unknown field"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_route_norm_default_depends_on_top_k():
    assert ModelConfig(top_k=2).normalize_routes and not ModelConfig(top_k=1).normalize_routes
    assert parse_overrides(["route_norm=false"]) == {"route_norm": False}


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": True}, {"moe_layer_freq": 1, "top_k": 3},
                                     {"layer_experts": (4, 7)}])
def test_parameter_count_matches_model(changes):
    from ds_upcycle.config import count_parameters
    from ds_upcycle.model import Transformer

    cfg = resolve_model_config("tiny-il", ["vocab_size=300"]).replace(**changes)
    model = Transformer(cfg)
    total, active = count_parameters(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.moe_layers[0].local_experts[0].parameters())
    assert total - active == sum(n - cfg.top_k for n in cfg.experts_per_layer) * expert


def test_layer_experts_build_layers_of_different_sizes():
    from ds_upcycle.model import Transformer

    base = resolve_model_config("tiny-il", ["vocab_size=300", "n_layers=4"])   # MoE blocks 1 and 3
    cfg = ModelConfig.from_dict({**base.to_dict(), "layer_experts": [4, 6]})    # as JSON gives it
    assert cfg.layer_experts == (4, 6) and cfg.experts_per_layer == [4, 6]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    model = Transformer(cfg)
    assert [router.num_experts for router in model.routers] == [4, 6]
    assert [router.route_bias.numel() for router in model.routers] == [4, 6]
    with pytest.raises(UserError, match="layer_experts has 3 entries for 2 MoE layers"):
        base.replace(layer_experts=(4, 4, 4))
    with pytest.raises(UserError, match="exceeds num_experts 1 of a MoE layer"):
        base.replace(layer_experts=(4, 1))


def test_route_groups_validated():
    base = resolve_model_config("tiny-il", ["vocab_size=300", "n_layers=4", "num_experts=4"])  # 2 MoE layers
    cfg = ModelConfig.from_dict({**base.to_dict(), "route_groups": [[0, 1, 0, 1], [0, 1, 2, 3]]})
    assert cfg.route_groups == ((0, 1, 0, 1), (0, 1, 2, 3)) and cfg.groups_in_block(3) == (0, 1, 2, 3)
    with pytest.raises(UserError, match="route_groups cover"):
        base.replace(route_groups=((0, 1, 0, 1),))
    with pytest.raises(UserError, match="at least top_k 2"):
        base.replace(route_groups=((0, 0, 0, 0), (0, 1, 2, 3)))
