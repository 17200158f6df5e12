"""Human-readable summary of an expansion plan (from its manifest)."""

from __future__ import annotations


def describe_plans(manifest: dict) -> str:
    src, dst, options = manifest["source"], manifest["target"], manifest["options"]
    lines = [f"source {src['path']} (tag {src['tag']}, world {src['world_size']}, ep {src['ep_size']}) -> "
             f"world {dst['world_size']}, ep {dst['ep_size']}; select {options['select']}, allocate "
             f"{options.get('allocate', 'proportional')}, optimizer state {options.get('optimizer_state', 'copy')}"]
    for layer in manifest["layers"]:
        lines.append(f"MoE layer {layer['index']} ({layer['prefix']}): {layer['num_source']} -> "
                     f"{layer['num_target']} experts")
        scores = layer["scores"]
        for expert, count in enumerate(layer["counts"]):
            slots = [j for j, s in enumerate(layer["sources"]) if s == expert]
            score = f"  score {scores[expert]:.4g}" if scores else ""
            lines.append(f"  expert {expert:>3}: {count} cop{'y' if count == 1 else 'ies'} -> new ids "
                         f"{', '.join(map(str, slots))}{score}")
        loads = ", ".join(f"{share:.3f}" for share in layer["rank_loads"])
        lines.append(f"  expected token share per ep rank (even split among copies): {loads}")
    return "\n".join(lines)
