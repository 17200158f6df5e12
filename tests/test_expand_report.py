"""What `ds-upcycle expand` prints: one line per MoE layer; every expert only with --show-plan."""

from ds_upcycle.upcycle.report import describe_plans


def manifest(counts, scores, rank_loads):
    sources = [e for e, c in enumerate(counts) for _ in range(c)]
    return {"source": {"path": "src/global_step10", "tag": "global_step10", "world_size": 1, "ep_size": 1},
            "target": {"world_size": 2, "ep_size": 2},
            "options": {"select": "grad_sq", "allocate": "rank", "optimizer_state": "copy"},
            "layers": [{"index": 0, "prefix": "layers.0.ffn.moe", "num_source": len(counts),
                        "num_target": sum(counts), "counts": counts, "sources": sources, "scores": scores,
                        "rank_loads": rank_loads}]}


def test_one_line_per_layer():
    text = describe_plans(manifest([1, 2, 1, 4], [0.3, 0.4, 0.2, 0.9], [1.25, 0.75]))
    assert text.splitlines()[1:] == ["MoE layer 0 (layers.0.ffn.moe): 4 -> 8 experts, copies per expert 1,2,1,4; "
                                     "scores 0.2..0.9; busiest ep rank 1.250 of the even token share"]
    # 64 -> 128 by the rank fill: 21 experts x4, 1 x2 (21 * 3 + 1 = 64 extra), 42 single
    counts = [4] * 21 + [2] + [1] * 42
    line = describe_plans(manifest(counts, None, [1.0, 1.0])).splitlines()[1]
    assert line == ("MoE layer 0 (layers.0.ffn.moe): 64 -> 128 experts, copies: 21 experts x4, 1 expert x2, "
                    "42 experts x1")


def test_every_expert_on_request():
    lines = describe_plans(manifest([1, 2, 1, 4], None, [1.0, 1.0]), per_expert=True).splitlines()
    assert lines[2:6] == ["  expert   0: 1 copy -> new ids 0", "  expert   1: 2 copies -> new ids 1, 2",
                          "  expert   2: 1 copy -> new ids 3", "  expert   3: 4 copies -> new ids 4, 5, 6, 7"]
