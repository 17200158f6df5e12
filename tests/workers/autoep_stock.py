"""A stock DeepSpeed AutoEP training script of a tiny transformers Qwen3-MoE, plus the one call of
ds_upcycle.moe.autoep when --balance is given.

    [deepspeed --num_gpus N] autoep_stock.py --out OUT.json [--balance U] [--steps S] [--save DIR] [--load DIR]

The script is what a user writes (the preset, no ds-upcycle model). For the tests it also records,
independently of the balancer, which experts the routers chose in every training step (a forward
hook on each AutoEP router, summed over processes), the bias after every step, and with --save the
expert_bias entries of the saved model-states file.
"""

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import transformers

from ds_upcycle import comm
from ds_upcycle.moe.autoep import attach_loss_free_balancing, patch_transformers_registry

NUM_EXPERTS = 8


def model_config() -> transformers.Qwen3MoeConfig:
    return transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       num_experts=NUM_EXPERTS, num_experts_per_tok=2, decoder_sparse_step=1,
                                       max_position_embeddings=64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int)
    parser.add_argument("--out", required=True)
    parser.add_argument("--balance", type=float, default=None)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save", default=None)
    parser.add_argument("--load", default=None)
    parser.add_argument("--token-ids", type=int, default=128, help="draw tokens from the first N ids (few: skewed loads)")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    patch_transformers_registry()
    comm.single_process_env()  # the test's plumbing: one process without a launcher
    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(model_config())
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                 "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "torch_adam": True}},
                 "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
                 "expert_parallel": {"enabled": True, "autoep_size": world, "preset_model": "qwen3_moe"}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    balancer = attach_loss_free_balancing(engine, args.balance) if args.balance is not None else None
    if args.load:
        engine.load_checkpoint(args.load, tag="t")

    layers = [m for m in engine.module.modules() if type(m).__name__ == "AutoEPMoELayer"]
    chosen = torch.zeros(len(layers), NUM_EXPERTS)
    for index, layer in enumerate(layers):
        def count(router, inputs, output, index=index):
            if router.training:
                chosen[index] += torch.bincount(output[1].flatten(), minlength=NUM_EXPERTS).float()
        layer.router.register_forward_hook(count)

    def biases():
        return [layer.expert_bias.tolist() if layer.expert_bias is not None else None for layer in layers]

    record = {"world": world, "bias_at_start": biases(), "loads": [], "bias": []}
    gen = torch.Generator().manual_seed(1 + engine.global_rank)
    for _ in range(args.steps):
        chosen.zero_()
        for _ in range(engine.gradient_accumulation_steps()):
            ids = torch.randint(0, args.token_ids, (2, 16), generator=gen)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        with torch.no_grad():  # an eval pass between steps: the balancer must not count it
            engine.eval()
            engine(input_ids=torch.randint(0, 128, (2, 16), generator=gen))
            engine.train()
        total = chosen.clone()
        dist.all_reduce(total)
        record["loads"].append(total.tolist())
        record["bias"].append(biases())
    if balancer is not None:
        record["last_load"] = balancer.last_load
    if args.save:
        engine.save_checkpoint(args.save, tag="t")
        saved = torch.load(Path(args.save) / "t" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        record["saved_bias"] = {k: v.tolist() for k, v in saved.items() if k.endswith("expert_bias")}
    if engine.global_rank == 0:
        Path(args.out).write_text(json.dumps(record))
    dist.barrier()


if __name__ == "__main__":
    main()
