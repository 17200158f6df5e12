"""Releases that keep an MoE layer's experts fused, one tensor per weight kind (transformers 5).

transformers 5 holds a layer's experts as `<block>.experts.gate_up_proj` [E, 2F, D] (every
expert's gate rows, then its up rows) and `<block>.experts.down_proj` [E, D, F], writes them so with
`save_pretrained(save_original_format=False)`, and newer releases ship that way. Its module names
are also where a few families moved other tensors: Mixtral's MoE block is `mlp` (not
`block_sparse_moe`), ERNIE 4.5's selection bias sits under the router (`mlp.gate.moe_statics`).

`per_expert_view` shows such a directory under the per-expert names of the family's table
(`Family.name_pairs`), each expert's weight a slice of its fused tensor read when asked for; the
rest of import is then the same for either layout. A layer's fused tensor is kept while its experts
are read (the writer asks for them in order), so memory holds one fused tensor, not the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ..config import ModelConfig
from .family import Family

FUSED_BLOCK = "mlp"            # transformers 5's MoE block, in every family
GATE_UP, DOWN = "experts.gate_up_proj", "experts.down_proj"


def is_fused(names: Mapping[str, object]) -> bool:
    return any(name.endswith("." + GATE_UP) for name in names)


class _PerExpert(Mapping):
    def __init__(self, family: Family, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        # per-expert name -> (fused name, expert, which rows: "gate", "up" or None for all); renamed -> fused name
        self.slices: dict[str, tuple[str, int, str | None]] = {}
        self.renamed: dict[str, str] = {}
        fused_names: set[str] = set()
        for i in cfg.moe_layer_ids:
            theirs, fused = f"model.layers.{i}.{family.moe_block}.", f"model.layers.{i}.{FUSED_BLOCK}."
            gate, up, down = family.expert_names
            for e in range(cfg.experts_in_block(i)):
                self.slices[f"{theirs}experts.{e}.{gate}.weight"] = (fused + GATE_UP, e, "gate")
                self.slices[f"{theirs}experts.{e}.{up}.weight"] = (fused + GATE_UP, e, "up")
                self.slices[f"{theirs}experts.{e}.{down}.weight"] = (fused + DOWN, e, None)
            fused_names |= {fused + GATE_UP, fused + DOWN}
            self.renamed[theirs + "gate.weight"] = fused + "gate.weight"
            if family.bias_name is not None:
                self.renamed[theirs + family.bias_name] = fused + (family.fused_bias_name or family.bias_name)
        self.renamed = {ours: fused for ours, fused in self.renamed.items() if ours != fused and fused in tensors}
        hidden = fused_names | set(self.renamed.values())
        self.names = [n for n in tensors if n not in hidden] + list(self.renamed) + [
            n for n, (fused, _, _) in self.slices.items() if fused in tensors]
        self._known = set(self.names)
        self._held: tuple[str, torch.Tensor] | None = None

    def _fused(self, name: str) -> torch.Tensor:
        if self._held is None or self._held[0] != name:
            self._held = (name, self.tensors[name])
        return self._held[1]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.slices:
            fused, expert, rows = self.slices[name]
            weight = self._fused(fused)[expert]
            if rows is None:
                return weight.clone()
            half = weight.shape[0] // 2
            return (weight[:half] if rows == "gate" else weight[half:]).clone()
        return self.tensors[self.renamed.get(name, name)]

    def __contains__(self, name: object) -> bool:  # without reading the tensor, as Mapping's would
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def per_expert_view(family: Family, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """`tensors` under the family's per-expert names when the directory is fused; else `tensors`."""
    return _PerExpert(family, cfg, tensors) if is_fused(tensors) else tensors
