"""Exports of every family for scripts/serve_check.py: a release imported, grown and written back.

For each family `ds-upcycle export` writes (ERNIE 4.5 MoE and GLM-4 MoE are also the classes
ds-upcycle's own softmax and sigmoid models export to), builds a small random release with
transformers (every weight random, the selection biases too, so that a router that ignores them
shows; `ernie4_5_moe-zero-bias` is the ERNIE 4.5 release with its selection biases zero, expanded
with `--router-noise 0` so that they stay zero: the control that tells a router ignoring the bias
from any other difference), then runs, as a user does:

    ds-upcycle import RELEASE CKPT
    ds-upcycle expand CKPT GROWN -m 2 --select uniform
    ds-upcycle export GROWN OUT/<family>/export

Sizes are the smallest vLLM's CPU kernels take (head size 32). Run in ds-upcycle's environment:

    python scripts/serving_exports.py runs/serving
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from ds_upcycle.data.sources import resolve_source
from ds_upcycle.data.tokenizer import train_tokenizer as train_sentencepiece

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
FAMILY_CONFIGS = {
    "mixtral": dict(intermediate_size=64, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2, num_experts=4,
                      num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True),
    "olmoe": dict(intermediate_size=64, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                  norm_topk_prob=False),
    "ernie4_5_moe": dict(intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2, moe_num_experts=4,
                         moe_k=2, moe_num_shared_experts=0, moe_layer_start_index=0, moe_layer_interval=1),
    "glm4_moe": dict(intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2, n_routed_experts=4,
                     num_experts_per_tok=2, n_shared_experts=0, first_k_dense_replace=0, n_group=1, topk_group=1,
                     use_qk_norm=True),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random; norms near 1, selection biases on the scale of the routing scores."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.numel() or not tensor.is_floating_point() or "inv_freq" in name:
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if "norm" in name:
                tensor.copy_(1 + 0.2 * noise)
            elif "bias" in name:
                tensor.copy_(0.1 * noise)
            else:
                tensor.copy_(0.08 * noise)


VARIANTS = {"ernie4_5_moe-zero-bias": "ernie4_5_moe"}  # name -> the family it is a release of


def build_release(name: str, out: Path, tokenizer: Path) -> None:
    model_type = VARIANTS.get(name, name)
    fields = {**COMMON, **FAMILY_CONFIGS[model_type]}
    if model_type == "glm4_moe":
        fields["rope_parameters"] = {**fields["rope_parameters"], "partial_rotary_factor": 1.0}
    config = transformers.AutoConfig.for_model(model_type, **fields)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(model, seed=sorted(FAMILY_CONFIGS).index(model_type))
    if name.endswith("-zero-bias"):
        with torch.no_grad():
            for param_name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                if "e_score_correction_bias" in param_name:
                    tensor.zero_()
    model.save_pretrained(str(out))
    shutil.copyfile(tokenizer, out / "tokenizer.model")


def train_tokenizer(out: Path) -> Path:
    """A SentencePiece tokenizer of VOCAB ids, from the built-in synthetic source."""
    docs = [doc for _, doc in zip(range(2000), resolve_source("synthetic:docs=2000,seed=0", "text").documents())]
    return train_sentencepiece(docs, VOCAB, out / "tokenizer.model")


def ds_upcycle(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ds_upcycle.cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--families", default=",".join([*FAMILY_CONFIGS, *VARIANTS]))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = args.out / "tokenizer.model"
    if not tokenizer.exists():
        train_tokenizer(args.out)
    for model_type in args.families.split(","):
        work = args.out / model_type
        if (work / "export" / "config.json").exists():
            continue
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        build_release(model_type, work / "release", tokenizer)
        ds_upcycle("import", str(work / "release"), str(work / "ckpt"))
        noise = ["--router-noise", "0"] if model_type.endswith("-zero-bias") else []
        ds_upcycle("expand", str(work / "ckpt"), str(work / "grown"), "-m", "2", "--select", "uniform", *noise)
        ds_upcycle("export", str(work / "grown"), str(work / "export"))
        print(f"{model_type}: {work / 'export'}", flush=True)


if __name__ == "__main__":
    main()
