"""A stock DeepSpeed AutoEP training script of a tiny transformers Qwen3-MoE (or Mixtral, --family
mixtral: AutoEP's mixtral preset), plus the one call of ds_upcycle.moe.autoep when --balance is given.

    [deepspeed --num_gpus N] autoep_stock.py --out OUT.json [--balance U] [--steps S] [--save DIR] [--load DIR]
        [--num-experts E] [--autoep-size P] [--dump FILE] [--zero-stage Z] [--bf16] [--family F]
        [--continue-steps N]

The script is what a user writes (the preset, no ds-upcycle model). For the tests it also records,
independently of the balancer, which experts the routers chose in every training step (a forward
hook on each AutoEP router, summed over processes), the bias after every step, the loss of every
micro-batch, and with --save the expert_bias entries of the saved model-states file. With --dump,
after loading (or, without --load, before saving) every process writes FILE.rank<R>: the fp32
master weight and Adam moments of every router and of every expert it holds, by global expert id,
through DeepSpeed's own safe_get_full_* accessors. With --continue-steps, after the steps (and the
save) it trains N more on data drawn as a new job draws it, recorded as continued_losses (their loads
and biases join the others): the losses a job that loads the checkpoint on this layout must take.
"""

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import transformers
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from ds_upcycle import comm
from ds_upcycle.quick_exit import exit_process
from ds_upcycle.moe.autoep import attach_loss_free_balancing, patch_transformers_registry

def model_config(family: str, num_experts: int) -> transformers.PretrainedConfig:
    if family == "mixtral":
        return transformers.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          num_local_experts=num_experts, num_experts_per_tok=2,
                                          max_position_embeddings=64)
    return transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       num_experts=num_experts, num_experts_per_tok=2, decoder_sparse_step=1,
                                       max_position_embeddings=64)


def dump_state(engine, layers, path: str) -> None:
    """Master weights and moments of routers and this process's experts, by (layer, name[, global expert])."""
    if engine.zero_optimization():
        # DeepSpeed 0.19.8 links optimizer-state fragments once, when only the first group has state;
        # relink so the expert group is visible to safe_get_full_optimizer_state.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()

    def full(param):
        if not engine.zero_optimization():  # the module weights are the masters, the torch optimizer has the rest
            return {"fp32": param.detach().clone(),
                    **{key: engine.optimizer.state[param][key].clone() for key in ("exp_avg", "exp_avg_sq")}}
        return {"fp32": safe_get_full_fp32_param(param).clone(),
                **{key: safe_get_full_optimizer_state(param, key).clone() for key in ("exp_avg", "exp_avg_sq")}}

    state = {}
    for index, layer in enumerate(layers):
        state[(index, "router")] = full(layer.router.gate.weight)
        for weight in ("w1", "w2", "w3"):
            fused = full(getattr(layer.experts, weight))
            for local in range(layer.num_local_experts):
                expert = layer.ep_rank * layer.num_local_experts + local
                state[(index, weight, expert)] = {key: t[local] for key, t in fused.items()}
    torch.save(state, f"{path}.rank{engine.global_rank}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int)
    parser.add_argument("--out", required=True)
    parser.add_argument("--balance", type=float, default=None)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save", default=None)
    parser.add_argument("--load", default=None)
    parser.add_argument("--token-ids", type=int, default=128,
                        help="draw tokens from the first N ids (few: skewed loads)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--autoep-size", type=int, default=None, help="default: the number of processes")
    parser.add_argument("--dump", default=None)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--family", choices=("qwen3_moe", "mixtral"), default="qwen3_moe",
                        help="the transformers class and AutoEP preset")
    parser.add_argument("--continue-steps", type=int, default=0)
    args = parser.parse_args(argv)

    patch_transformers_registry()
    comm.single_process_env()  # the test's plumbing: one process without a launcher
    comm.init_distributed(dist_backend="gloo")  # DeepSpeed's own, and its CPU shared memory unlinked
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(model_config(args.family, args.num_experts))
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                 "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "torch_adam": True}},
                 "zero_optimization": {"stage": args.zero_stage}, "steps_per_print": 10**9,
                 "bf16": {"enabled": args.bf16},
                 "expert_parallel": {"enabled": True, "autoep_size": args.autoep_size or world,
                                     "preset_model": args.family}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    balancer = attach_loss_free_balancing(engine, args.balance) if args.balance is not None else None
    if args.load:
        engine.load_checkpoint(args.load, tag=None)

    layers = [m for m in engine.module.modules() if type(m).__name__ == "AutoEPMoELayer"]
    if args.dump and args.load:
        dump_state(engine, layers, args.dump)
    chosen = torch.zeros(len(layers), args.num_experts)
    for index, layer in enumerate(layers):
        def count(router, inputs, output, index=index):
            if router.training:
                chosen[index] += torch.bincount(output[1].flatten(), minlength=args.num_experts).float()
        layer.router.register_forward_hook(count)

    def biases():
        return [layer.expert_bias.tolist() if layer.expert_bias is not None else None for layer in layers]

    record = {"world": world, "bias_at_start": biases(), "loads": [], "bias": [], "losses": []}

    def train(steps: int, losses: list) -> None:
        gen = torch.Generator().manual_seed(1 + engine.global_rank)  # every job draws the same data
        for _ in range(steps):
            chosen.zero_()
            for _ in range(engine.gradient_accumulation_steps()):
                ids = torch.randint(0, args.token_ids, (2, 16), generator=gen)
                loss = engine(input_ids=ids, labels=ids).loss
                losses.append(loss.item())
                engine.backward(loss)
                engine.step()
            with torch.no_grad():  # an eval pass between steps: the balancer must not count it
                engine.eval()
                engine(input_ids=torch.randint(0, 128, (2, 16), generator=gen))
                engine.train()
            total = chosen.clone()
            dist.all_reduce(total)
            record["loads"].append(total.tolist())
            record["bias"].append(biases())

    train(args.steps, record["losses"])
    if balancer is not None:
        record["last_load"] = balancer.last_load
    if args.dump and not args.load:
        dump_state(engine, layers, args.dump)
    if args.save:
        engine.save_checkpoint(args.save, tag="t")
        saved = torch.load(Path(args.save) / "t" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        record["saved_bias"] = {k: v.tolist() for k, v in saved.items() if k.endswith("expert_bias")}
    if args.continue_steps:
        record["continued_losses"] = []
        train(args.continue_steps, record["continued_losses"])
    if engine.global_rank == 0:
        Path(args.out).write_text(json.dumps(record))
    dist.barrier()


if __name__ == "__main__":
    main()
    exit_process()  # the test's plumbing: no 2 s of teardown collections (ds_upcycle.quick_exit)
