import base64
import contextlib
import fcntl
import functools
import hashlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
import traceback
import unittest.mock
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is first imported

from ds_upcycle import cli, comm  # noqa: E402
from ds_upcycle.comm import free_port  # noqa: E402  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]
SMALL_DATA = "synthetic:docs=1500,seed=0,entities=40"


def write_ds_config(path: Path, stage: int = 2, micro_batch: int = 4, grad_accum: int = 1, lr: float = 3e-3) -> Path:
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}))
    return path


def bf16_ds_config(path: Path, **changes) -> Path:
    """The shipped ds_configs/zero2_bf16.json with micro-batch 4 and `changes`, written to `path`."""
    config = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    path.write_text(json.dumps({**config, "train_micro_batch_size_per_gpu": 4, **changes}))
    return path


def launcher(procs: int) -> list[str]:
    """The command that starts a script on `procs` local processes: plain python for one; for more,
    DeepSpeed's per-node launcher, which is what the `deepspeed` command runs for local processes once
    it has found them (the same ranks, environment and rendezvous), without the `deepspeed` command's
    own interpreter start (a 2-process 3-step train.py: 12.6 s against 15.1 s, one measurement). The
    tests that start with `run_train(..., runner=True)` and `ds-upcycle reproduce` go through `deepspeed`."""
    if procs <= 1:
        return [sys.executable]
    hosts = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(procs))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={hosts}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}"]


def launch_env(env: dict | None = None) -> dict:
    """The environment of a launched job: CPU accelerator, one thread a process, no inherited rank,
    the repository on the path as `deepspeed` puts the working directory there."""
    full = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    full.pop("RANK", None)
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full.get("PYTHONPATH")) if p)
    return full


def run_train(args: list[str], num_procs: int = 0, cwd: Path = ROOT, timeout: int = 600,
              env: dict | None = None, runner: bool = False) -> subprocess.CompletedProcess:
    """Run train.py: on one process, its main in this one (train_in_process); on num_procs processes,
    through DeepSpeed's launcher (`launcher`), or with runner through the `deepspeed` command as a
    user would."""
    if num_procs <= 1 and not runner:
        return train_in_process(args, cwd, env)
    if runner:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs),
               "--master_port", str(free_port()), str(ROOT / "train.py"), *args]
    else:
        cmd = [*launcher(num_procs), str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=launch_env(env), capture_output=True, text=True, timeout=timeout)


@functools.cache
def script_function(path: str, name: str):
    """A function of a script (train.py, a test worker), the script read once per test process."""
    return runpy.run_path(path)[name]


TRAIN = str(ROOT / "train.py")


@contextlib.contextmanager
def one_process_launch(cwd: Path = ROOT, env: dict | None = None):
    """This process as a one-process launch sees it, for the duration of the block: launch_env's
    environment, one torch thread, the working directory; all three restored after. A launch spends
    seconds importing and tearing down torch and DeepSpeed around a tiny job that takes a fraction
    of one (a 1-process 8-step train.py run, one measurement: 6.2 s launched, 0.5 s here once warm).
    A world-size-1 process group the block starts stays up for the next (what it costs a process
    to tear one down is what the launched tests and the stages of `reproduce` cover)."""
    environ, threads, here = dict(os.environ), torch.get_num_threads(), os.getcwd()
    launched = launch_env(env)
    os.environ.clear()
    os.environ.update(launched)
    torch.set_num_threads(1)
    os.chdir(cwd)
    try:
        with unittest.mock.patch.object(comm, "shutdown", lambda: None):
            yield
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)


def train_in_process(args: list[str], cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """train.py's main in this process (one_process_launch), its output captured, an escaping
    exception as the traceback and exit status 1 a user would get."""
    out, err = io.StringIO(), io.StringIO()
    with one_process_launch(cwd, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = script_function(TRAIN, "main")(args)
        except SystemExit as exit:  # argparse's refusals
            status = exit.code if isinstance(exit.code, int) else 2
        except Exception:  # noqa: BLE001  (what the process would print before exiting 1)
            traceback.print_exc()
            status = 1
    return subprocess.CompletedProcess(["train.py", *args], status, out.getvalue(), err.getvalue())


def shared_base(tmp_path_factory) -> Path:
    """A folder that every worker of this test run sees (pytest-xdist gives each worker its own base
    folder inside the run's; without xdist, the run's own base folder)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    return shared_base(tmp_path_factory)


def built_once(root: Path, name: str, build) -> dict:
    """`build(folder)`'s JSON record, run by the first worker that asks; the others wait and read it."""
    folder, record = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not record.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            record.write_text(json.dumps(build(folder)))
        return json.loads(record.read_text())


@pytest.fixture(scope="session")
def data_cache(shared_root) -> Path:
    """Prepared data, shared by the workers (data preparation writes atomically)."""
    path = shared_root / "data-cache"
    path.mkdir(exist_ok=True)
    return path


def tiny_run_args(ds_config: Path, steps: int, data_cache: Path, *extra: str) -> list[str]:
    """train.py arguments for a fast tiny run on small synthetic data (later flags override earlier)."""
    return ["--deepspeed_config", str(ds_config), "--steps", str(steps), "--data", SMALL_DATA,
            "--vocab-size", "512", "--seq-len", "32", "--data-cache", str(data_cache),
            "--set", "dim=64", "--set", "dense_ffn_dim=128", "--set", "expert_ffn_dim=64",
            "--eval-samples", "16", *extra]


@pytest.fixture
def train_args(data_cache):
    def make(ds_config: Path, steps: int, *extra: str) -> list[str]:
        return tiny_run_args(ds_config, steps, data_cache, *extra)
    return make


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`ds-upcycle ARGS` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "ds_upcycle.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})


class CliResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def cli_in_process(*args: str) -> CliResult:
    """`ds-upcycle ARGS` run by click's test runner in this process: the command's whole path from
    parsing to exit status, without the interpreter start and the seconds of imports each subprocess
    pays (the entry point itself is run_cli's). As in run_cli: the CPU accelerator, one thread; the
    environment and thread count are restored after, so an option like --trust-checkpoints does not
    outlive the call. An exception the command lets escape is appended to stderr as the traceback
    a user would see."""
    environ, threads = dict(os.environ), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner(env={"DS_ACCELERATOR": "cpu"}).invoke(cli.main, list(args))
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
    return CliResult(result.exit_code, result.stdout, stderr)


def train_refusal(argv: list[str], monkeypatch) -> CliResult:
    """train.py's main run in this process, for an input it must refuse before the processes meet:
    fails the test if it gets as far as initialising the process group. Its exit status and output.
    The guard ends with the call (a test may go on to train)."""
    def meets(*args, **kwargs):
        raise AssertionError("train.py initialised the process group before refusing")

    out, err = io.StringIO(), io.StringIO()
    with monkeypatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setattr(comm, "init_distributed", meets)
        try:
            status = script_function(TRAIN, "main")(argv)
        except SystemExit as exit:  # argparse's own refusals
            status = exit.code
    return CliResult(status, out.getvalue(), err.getvalue())


def expand_cli(*args: str) -> CliResult:
    """`ds-upcycle expand ARGS`, in this process (cli_in_process)."""
    return cli_in_process("expand", *args)


AUTOEP_STOCK = str(ROOT / "tests" / "workers" / "autoep_stock.py")


def run_autoep_stock(out: Path, *args: str, procs: int = 1) -> dict:
    """The stock AutoEP script (tests/workers/autoep_stock.py) on `procs` processes (one: its main in
    this process, one_process_launch); its record."""
    if procs == 1:
        with one_process_launch():
            script_function(AUTOEP_STOCK, "main")(["--out", str(out), *args])
    else:
        command = launcher(procs)
        port = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--master_port="))
        check_ok(subprocess.run([*command, AUTOEP_STOCK, "--out", str(out), *args], cwd=ROOT,
                                env=launch_env(), capture_output=True, text=True, timeout=600))
        # its ranks' DeepSpeed CPU shared-memory segments (named by the launch's port) went with it
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return json.loads(Path(out).read_text())


# The trained source of the expansion tests: what its training run was given besides tiny_run_args.
SOURCE_MODEL = ("--set", "expert_ffn_dim=48")
SOURCE_STEPS = 12


@pytest.fixture(scope="session")
def trained_source(shared_root, data_cache) -> dict:
    """One checkpoint that test_expand, test_calibration and test_warmstart all read (never write):
    the tiny model narrowed (4 experts per MoE layer, top-2), trained 12 ZeRO-2 steps on 2 processes
    with ep_size 2, and the digest of its files. Built once per test run."""
    def build(root: Path) -> dict:
        cfg = write_ds_config(root / "z2.json", stage=2, micro_batch=4)
        src = root / "src"
        check_ok(run_train(tiny_run_args(cfg, SOURCE_STEPS, data_cache, *SOURCE_MODEL, "--eval-samples", "8",
                                         "--ep-size", "2", "--save", str(src)), num_procs=2))
        return {"cfg": str(cfg), "src": str(src), "digest": tree_digest(src)}

    record = built_once(shared_root, "trained-source", build)
    src = Path(record["src"])
    return {"cfg": Path(record["cfg"]), "src": src, "tag": src / (src / "latest").read_text().strip(),
            "cache": str(data_cache), "digest": record["digest"]}


@pytest.fixture(scope="session")
def bf16_source(shared_root, data_cache) -> dict:
    """A bf16 ZeRO-2 checkpoint (bf16_zero_pp_rank_* files) of the trained source's model, 3 steps on one
    process, and its DeepSpeed config; shared by the bf16 expansion and calibration tests (which only read
    it). Built once per test run."""
    def build(root: Path) -> dict:
        cfg, src = bf16_ds_config(root / "bf16.json"), root / "src"
        check_ok(run_train(tiny_run_args(cfg, 3, data_cache, *SOURCE_MODEL, "--eval-samples", "8", "--save",
                                         str(src))))
        return {"cfg": str(cfg), "src": str(src)}

    record = built_once(shared_root, "bf16-source", build)
    return {"cfg": Path(record["cfg"]), "src": Path(record["src"])}


# Files that take minutes go first, longest first (as measured in a 2-worker run), so that
# with several workers (scripts/test.sh runs pytest-xdist, a whole file per worker, in collection
# order) no worker is left running a long file alone at the end.
LONG_FILES = ("test_eval_tasks.py", "test_autoep_checkpoint.py", "test_reproduce.py", "test_reproduce_seeds.py",
              "test_autoep_train.py", "test_expand.py", "test_checkpoint_io.py", "test_hf.py", "test_train.py",
              "test_checkpoint_stage0.py", "test_scoring.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: each file keeps its order
