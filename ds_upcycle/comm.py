"""Every collective ds-upcycle issues itself, in one place.

All functions are no-ops in a single process (torch.distributed not initialised), so the model and
the training loop run unchanged on one CPU.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import groups

from .cache import clear_stale_build_lock, extensions_dir


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def free_port() -> int:
    """A TCP port on the loopback interface that is free now: the rendezvous port of a new process group.

    Drawn below the kernel's ephemeral range: a port the kernel hands out for outgoing connections
    (gloo opens many) can be taken by one of them between this check and the rendezvous binding it,
    which jobs running side by side (a parallel test suite) then meet as EADDRINUSE."""
    low = _ephemeral_low()
    rng = random.Random()  # seeded from the OS: processes started together draw different ports
    for _ in range(64):
        port = rng.randrange(max(1024, low - 20000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # a crowded machine: any port the kernel calls free
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def single_process_env() -> None:
    """Let a script that calls deepspeed.init_distributed() run as one process, without a launcher."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def init_distributed(**kwargs) -> None:
    """deepspeed.init_distributed(**kwargs), without leaving DeepSpeed's CPU shared memory behind.

    On CPU, under the launcher, DeepSpeed's communication op gives every rank a segment in /dev/shm
    (about 69 MB, held in RAM) that the other ranks open by name while initialising, and never
    unlinks it: every launch would leave them behind until the machine runs out of memory. Once all
    ranks are through initialisation (the barrier) the names can go; the mappings stay valid.
    """
    _prepare_op_build()
    deepspeed.init_distributed(**kwargs)
    if not is_distributed():
        return
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    try:
        os.unlink(name)
    except FileNotFoundError:  # no shared-memory op in use (GPU, or ranks on several machines)
        pass


def _prepare_op_build() -> None:
    """On CPU DeepSpeed compiles its communication op the first time it starts, silently, for about
    a minute: keep the build in this environment's own folder (cache.extensions_dir; an explicit
    TORCH_EXTENSIONS_DIR wins) and say, once per launch, that the wait is a build."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    if get_accelerator().device_name() != "cpu" or os.environ.get("RANK", "0") != "0":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    built = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / builder.NAME / f"{builder.NAME}.so"
    if clear_stale_build_lock(built.parent):
        print(f"ds-upcycle: removed a stale build lock in {built.parent} (left by a process killed while it "
              f"built or checked DeepSpeed's CPU op)", file=sys.stderr, flush=True)
    if not built.exists():
        print(f"ds-upcycle: DeepSpeed is compiling its CPU communication op for this environment, once "
              f"(about a minute; later launches reuse {built.parent})", file=sys.stderr, flush=True)


def agree_capacity(local_max: torch.Tensor, group) -> torch.Tensor:
    """Largest per-expert token count over an expert-parallel group.

    Dropless routing sizes every expert buffer by the busiest expert; all ranks of the group must
    agree on it because the all-to-all exchanges equally sized buffers.
    """
    if group is not None and is_distributed() and dist.get_world_size(group) > 1:
        local_max = local_max.clone()
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    return local_max


def sum_over_world(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over every rank (in place when distributed); returns it."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def expert_replicas(group_name: str):
    """The ranks that hold the same experts as this one (DeepSpeed's expert data-parallel group of
    the MoE layers named `group_name`, "ep_size_<P>"); None in one process."""
    if not is_distributed():
        return None
    return groups._get_expert_data_parallel_group(group_name)


def mean_over_world(tensor: torch.Tensor, replicas) -> torch.Tensor:
    """Mean over all ranks of an expert parameter's gradient, in place.

    Each rank's gradient of an expert already sums the losses of its expert-parallel group (the
    all-to-all's backward carries every rank's tokens to the expert); summing over the replicas of
    the expert adds the other groups, and dividing by the world size makes the mean.
    """
    if replicas is not None and dist.get_world_size(replicas) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=replicas)
    return tensor.div_(world_size())


def gather_over_group(tensor: torch.Tensor, group) -> torch.Tensor:
    """Every rank's `tensor` of an expert-parallel group, concatenated along dim 0 in group rank
    order (the tensor itself without a group of more than one rank)."""
    if group is None or not is_distributed() or dist.get_world_size(group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def rank_zero_first(fn):
    """fn() on rank 0, then on the others: what rank 0 caches (prepared data), the others then find."""
    if rank() == 0:
        result = fn()
    barrier()
    if rank() != 0:
        result = fn()
    return result


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits.

    A gloo group left to the interpreter's exit is destroyed while its threads may still be
    joinable or a peer already gone, which aborts the process ("terminate called without an active
    exception") after all work is done.
    """
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
