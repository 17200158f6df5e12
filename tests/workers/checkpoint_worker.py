"""Oracle for checkpoint I/O: load checkpoints with stock `engine.load_checkpoint` on this layout.

    [deepspeed --num_gpus N] checkpoint_worker.py JOBS.json

JOBS.json is a list of {"ckpt", "ds_config", "dump", "ep_size" (default 1), "resave" (or null), "step"
(bool), "scheduler"
(bool, default true: false for a checkpoint saved without an LR scheduler), "module_dtype" (default
float32: the model's parameters are cast to it before initialize, as a script without an optimizer
would)}. A ds_config without an optimizer builds an engine without one. Jobs of different ep_size
share a launch: DeepSpeed keeps one expert-parallel group per size, by name. For each job every rank builds the model the checkpoint describes, loads it, and writes `<dump>.rank<r>.pt`:
every parameter's fp32 master weight and Adam moments through DeepSpeed's own accessors
(safe_get_full_*), module weights and buffers under layout-independent names, and the restored
scheduler, client state and step. With "resave" it then saves the engine again with
`engine.save_checkpoint` (DeepSpeed's own layout for this state), and with "step" it takes a
training step and records the loss and whether the weights moved.
"""

import argparse
import json
from functools import partial
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from ds_upcycle import comm
from ds_upcycle.quick_exit import exit_process
from ds_upcycle.model import Transformer
from ds_upcycle.checkpoint import find_checkpoint
from ds_upcycle.training.schedule import WSDSchedule


def full_state(engine, model: Transformer) -> dict:
    names = model.global_param_names()
    if engine.optimizer is None:  # the module weights are all there is
        return {names[name]: {"fp32": param.detach().float().clone(), "module": param.detach().clone()}
                for name, param in model.named_parameters()}
    if not engine.zero_optimization():
        # Without ZeRO the module weights are the fp32 master weights and the torch optimizer holds
        # each parameter's state whole: what DeepSpeed loaded is read directly.
        state = engine.optimizer.state
        return {names[name]: {"fp32": param.detach().clone(), "exp_avg": state[param]["exp_avg"].clone(),
                              "exp_avg_sq": state[param]["exp_avg_sq"].clone(), "module": param.detach().clone()}
                for name, param in model.named_parameters()}
    optimizer = engine.optimizer
    with_moments = bool(optimizer.optimizer.state)  # none before the first step
    # DeepSpeed 0.19.8 links optimizer-state fragments once, when only the first group has state;
    # relink so expert groups (later groups) are visible to safe_get_full_optimizer_state.
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()
    params = {}
    for name, param in model.named_parameters():  # same order on every rank: the getters are collectives
        params[names[name]] = {
            "fp32": safe_get_full_fp32_param(param).detach().cpu().clone(),
            **({key: safe_get_full_optimizer_state(param, key).detach().cpu().clone()
                for key in ("exp_avg", "exp_avg_sq")} if with_moments else {}),
            "module": param.detach().cpu().clone(),
        }
    return params


def training_step(engine, model: Transformer, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed * 1000 + comm.rank())
    tokens = torch.randint(model.cfg.vocab_size, (engine.train_micro_batch_size_per_gpu(), 17), generator=gen)
    before = [p.detach().clone() for p in model.parameters()]
    logits, aux = engine(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    engine.backward(loss + aux)
    engine.step()
    moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    return {"loss": loss.item(), "params_moved": moved, "params": len(before)}


def run_job(job: dict, index: int) -> None:
    ref = find_checkpoint(job["ckpt"])
    cfg, ep_size = ref.model_config, job.get("ep_size", 1)
    model = Transformer(cfg, ep_size=ep_size, ep_rank=comm.rank() % ep_size)
    for param in model.parameters():  # buffers (routing biases) stay fp32
        param.data = param.data.to(getattr(torch, job.get("module_dtype", "float32")))
    ds_config = json.loads(Path(job["ds_config"]).read_text())
    schedule_fn = partial(WSDSchedule, total=1) if job.get("scheduler", True) else None
    engine, _, _, schedule = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                  config=ds_config, lr_scheduler=schedule_fn)
    load_path, client = engine.load_checkpoint(str(ref.save_dir), tag=ref.tag)
    assert load_path is not None, f"nothing loaded from {ref.path}"
    if job.get("resave"):  # before full_state: reading the moments links (empty) optimizer states
        engine.save_checkpoint(job["resave"], tag=ref.tag, client_state={"ds_upcycle": client["ds_upcycle"]})
    dump = {
        "params": full_state(engine, model),
        "buffers": {name: buf.clone() for name, buf in model.state_dict().items() if "route_bias" in name},
        "global_steps": engine.global_steps,
        "lr_scheduler": schedule.state_dict() if schedule is not None else None,
        "client": client.get("ds_upcycle"),
        # ZeRO: one state per flat group; without ZeRO: one per parameter.
        "step": [float(s["step"]) for s in getattr(engine.optimizer, "optimizer", engine.optimizer).state.values()
                 if "step" in s] if engine.optimizer is not None else [],
        "num_experts": cfg.num_experts,
    }
    if job.get("step"):
        schedule.start_stage(10, 0, 0.1, 0.0, schedule.peak_lrs)  # the saved stage ended at LR 0
        dump["train_step"] = training_step(engine, model, index)
    torch.save(dump, f"{job['dump']}.rank{comm.rank()}.pt")
    comm.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int)
    parser.add_argument("jobs")
    args = parser.parse_args()
    run_jobs(json.loads(Path(args.jobs).read_text()))
    comm.shutdown()


def run_jobs(jobs: list[dict]) -> None:
    """Every job on this process's layout (the tests call it in their own process for one)."""
    comm.single_process_env()
    comm.init_distributed(dist_backend="gloo")
    for index, job in enumerate(jobs):
        run_job(job, index)


if __name__ == "__main__":
    main()
    exit_process()  # the test's plumbing: no 2 s of teardown collections (ds_upcycle.quick_exit)
