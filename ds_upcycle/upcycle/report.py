"""Human-readable summary of an expansion plan (from its manifest)."""

from __future__ import annotations


def describe_plans(manifest: dict, per_expert: bool = False) -> str:
    """The source and target, then one summary line per MoE layer (per_expert: every expert's copies;
    the manifest keeps the full plan either way)."""
    src, dst, options = manifest["source"], manifest["target"], manifest["options"]
    lines = [f"source {src['path']} (tag {src['tag']}, world {src['world_size']}, ep {src['ep_size']}) -> "
             f"world {dst['world_size']}, ep {dst['ep_size']}; select {options['select']}, allocate "
             f"{options.get('allocate', 'proportional')}, optimizer state {options.get('optimizer_state', 'copy')}"]
    for layer in manifest["layers"]:
        lines += _layer_lines(layer) if per_expert else [_layer_summary(layer)]
    return "\n".join(lines)


def _layer_summary(layer: dict) -> str:
    """One line: the growth, how many copies each expert got, the scores' range, an uneven ep split."""
    counts, scores = layer["counts"], layer["scores"]
    if len(counts) <= 16:
        copies = "copies per expert " + ",".join(map(str, counts))
    else:  # 64 -> 128: how many experts got each count, most copies first
        tally = {c: counts.count(c) for c in sorted(set(counts), reverse=True)}
        copies = "copies: " + ", ".join(f"{n} expert{'s' if n > 1 else ''} x{c}" for c, n in tally.items())
    line = f"MoE layer {layer['index']} ({layer['prefix']}): {layer['num_source']} -> {layer['num_target']} experts, {copies}"
    if scores:
        line += f"; scores {min(scores):.3g}..{max(scores):.3g}"
    loads = layer["rank_loads"]
    if len(loads) > 1 and max(loads) > min(loads):
        line += f"; busiest ep rank {max(loads):.3f} of the even token share"
    return line


def _layer_lines(layer: dict) -> list[str]:
    """Every expert's copies and their new ids (expand --show-plan)."""
    lines = [f"MoE layer {layer['index']} ({layer['prefix']}): {layer['num_source']} -> "
             f"{layer['num_target']} experts"]
    scores = layer["scores"]
    for expert, count in enumerate(layer["counts"]):
        slots = [j for j, s in enumerate(layer["sources"]) if s == expert]
        score = f"  score {scores[expert]:.4g}" if scores else ""
        lines.append(f"  expert {expert:>3}: {count} cop{'y' if count == 1 else 'ies'} -> new ids "
                     f"{', '.join(map(str, slots))}{score}")
    loads = ", ".join(f"{share:.3f}" for share in layer["rank_loads"])
    lines.append(f"  expected token share per ep rank (even split among copies): {loads}")
    return lines
