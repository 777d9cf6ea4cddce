"""One run on many processes (DDP): ranks from torchrun's and SLURM's variables, sharded batches, and N ranks that
compute what one process computes: the same gradients step by step (2 gloo processes, uneven shards), the same
per-epoch metrics end to end (torchrun), one MLflow run and one output folder, kill -9 of a rank, bad input."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from dmg.engine import distributed
from dmg.engine.distributed import ProcessGroup, Ranks, first_host, ranks_from_environment, shard_of
from dmg.errors import UserError
from dmg.runs.experiment import build_method, run
from tests.conftest import QUICK, compose_config

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["rot0", "rot15", "rot45", "rot60", "rot75"]


# ---- who is who ------------------------------------------------------------------------------------------------


def test_torchrun_variables_give_rank_local_rank_and_world_size():
    assert ranks_from_environment({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == Ranks(5, 1, 8)
    assert ranks_from_environment({}) == Ranks(0, 0, 1)


def test_slurm_variables_give_the_ranks_and_the_address_every_task_meets_at():
    environ = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "3",
        "SLURM_JOB_NODELIST": "gpu[07-08,12]",
        "SLURM_JOB_ID": "123456",
    }
    assert ranks_from_environment(environ) == Ranks(3, 3, 8)
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("gpu07", str(20_000 + 123456 % 20_000))
    given = {**environ, "MASTER_ADDR": "head", "MASTER_PORT": "1234", "SLURM_STEP_NUM_TASKS": "2"}
    assert ranks_from_environment(given) == Ranks(3, 3, 2) and given["MASTER_PORT"] == "1234"
    assert ranks_from_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == Ranks()  # one task: one process


def test_first_host_of_slurm_node_lists():
    assert first_host("node1") == "node1"
    assert first_host("a[009-011],b[1-2]") == "a009"
    assert first_host("cn12,cn13") == "cn12"


def test_torchrun_variables_win_over_slurm_ones():
    environ = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    assert ranks_from_environment(environ) == Ranks(1, 1, 2)


def test_each_rank_gets_its_own_gpu_and_a_backend_that_fits_the_device():
    assert distributed.device_for("cuda", Ranks(5, 1, 8)) == "cuda:1"
    assert distributed.device_for("cuda", Ranks()) == "cuda"
    assert distributed.device_for("cuda:3", Ranks(5, 1, 8)) == "cuda:3"
    assert distributed.device_for("cpu", Ranks(5, 1, 8)) == "cpu"
    assert distributed.backend_for("auto", torch.device("cpu")) == "gloo"
    assert distributed.backend_for("auto", torch.device("cuda:0")) == "nccl"
    with pytest.raises(UserError, match="distributed.backend=nccl needs CUDA GPUs"):
        distributed.backend_for("nccl", torch.device("cpu"))


def test_shards_are_contiguous_nearly_equal_and_cover_the_batch():
    shards = [shard_of(33, Ranks(rank, rank, 2)) for rank in range(2)]
    assert [(s.start, s.stop) for s in shards] == [(0, 17), (17, 33)]
    assert sum(s.weight for s in shards) == pytest.approx(1.0)
    assert [shard_of(10, Ranks(r, r, 4)).sizes[r] for r in range(4)] == [3, 3, 2, 2]


# ---- the same gradients as one process, step by step ------------------------------------------------------------

METHODS = {  # name: overrides; balanced-style batches for the methods that compare domains
    "aggregate": ["method=aggregate"],
    "multihead": ["method=multihead"],
    "dmg": ["method=dmg"],
    "dmg_element": ["method=dmg", "mask.granularity=element"],
    "coral": ["method=coral", "method.forward=joint"],  # per-domain passes run in one process only
    "mmd": ["method=mmd", "method.forward=joint"],
    "groupdro": ["method=groupdro", "method.forward=joint"],
    "irm": ["method=irm"],
    "vrex": ["method=vrex"],
    "dann": ["method=dann", "method.optimizer._target_=torch.optim.SGD", "~method.optimizer.betas"]
    + ["method.discriminator_optimizer._target_=torch.optim.SGD", "~method.discriminator_optimizer.betas"],
}
# Rounding: the gradient and BatchNorm sums add up in another order (a few 1e-6). MMD's kernel on squared distances
# computed as |a|^2 - 2ab + |b|^2 cancels catastrophically (within one process, a 1e-7 relative change of the features
# moves the penalty by ~1e-4, and fp32 and fp64 differ by ~2e-4), so it matches to 1e-3 only.
TOLERANCE = {"mmd": 2e-3}
SGD = ["optim.network._target_=torch.optim.SGD", "optim.masks._target_=torch.optim.SGD", "optim.lr=0.1"]
STEPS = 3


def _batch(rows: int = 15):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (rows,), generator=generator)
    d = torch.arange(rows) % len(SOURCES)  # every domain, 3 samples each
    return x, y, d


def _train(name: str, ranks: Ranks) -> dict:
    """``STEPS`` SGD updates of a method on one batch (this rank's shard of it): each step's gradients and loss terms,
    and the state after them (parameters, BatchNorm statistics, GroupDRO's weights)."""
    cfg = compose_config(QUICK + SGD + METHODS[name] + ["precision=fp32", "channels_last=false"])
    torch.manual_seed(0)
    method = build_method(cfg, SOURCES)
    if ranks.distributed:
        distributed.convert_batch_norm(method)
    method.train()
    x, y, d = _batch()
    shard = shard_of(len(y), ranks)
    distributed.set_batch_shard(shard)
    rows = slice(shard.start, shard.stop)
    terms, gradients = [], []
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # the step's own draws (DMG's masks), as the loop seeds them per epoch
        local = method.update(x[rows], y[rows], d[rows])
        terms.append({key: distributed.sum_across_ranks(value * shard.weight) for key, value in local.items()})
        gradients.append({key: p.grad.clone() for key, p in method.named_parameters() if p.grad is not None})
    return {"state": method.state_dict(), "gradients": gradients, "terms": terms}


def _rank_worker(rank: int, world: int, port: int, names: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = Ranks(rank, rank, world)
    with ProcessGroup(ranks, "gloo", torch.device("cpu"), timeout_s=120):
        results = {name: _train(name, ranks) for name in names}
    torch.save(results, f"{out}.{rank}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _slurm_job_id() -> int:
    """A job id whose derived port (20000 + id % 20000) is free here."""
    for job in range(os.getpid() % 20_000, 20_000 * 2, 7):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", 20_000 + job % 20_000))
                return job
            except OSError:
                continue
    raise AssertionError("no free port")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The norm of the difference relative to the norm of ``b`` (0 when both are 0)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


@pytest.fixture
def one_thread():
    """One intra-op thread, as each rank computes; restored afterwards (later in-process runs are compared with
    subprocesses that use the default count, and another count rounds differently)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_ranks_take_the_steps_one_process_takes_with_uneven_shards(tmp_path, one_thread):
    """15 samples split 8/7: the share-weighted gradients, the gathered batch statistics (CORAL, MMD, GroupDRO,
    IRM, VREx), BatchNorm over the global batch and DMG's per-sample mask draws give one process's parameters
    after every method's steps; every rank holds the same parameters and buffers (GroupDRO's weights too)."""
    names = list(METHODS)
    alone = {name: _train(name, Ranks()) for name in names}
    out = str(tmp_path / "ranks")
    mp.start_processes(_rank_worker, args=(2, _free_port(), names, out), nprocs=2, start_method="spawn")
    ranks = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]
    for name in names:
        tolerance = TOLERANCE.get(name, 2e-5)
        for key, value in alone[name]["state"].items():
            assert torch.equal(ranks[0][name]["state"][key], ranks[1][name]["state"][key]), (name, key)
            assert _relative(ranks[0][name]["state"][key], value) < tolerance, (name, key)
        for one, two in zip(alone[name]["gradients"], ranks[0][name]["gradients"]):
            assert set(one) == set(two), name  # a parameter without a gradient in one process has none here
            assert max(_relative(two[key], one[key]) for key in one) < tolerance, name
        for one, two in zip(alone[name]["terms"], ranks[0][name]["terms"]):
            assert max(_relative(two[key], one[key]) for key in one) < tolerance, name


def test_one_process_computes_without_a_process_group():
    assert not torch.distributed.is_initialized() and distributed.current() == Ranks()
    features = torch.randn(4, 3, requires_grad=True)
    assert distributed.gather_batch(features)[0] is features
    assert distributed.batch_shard(4).weight == 1.0


# ---- end to end: torchrun --------------------------------------------------------------------------------------

E2E = {  # method: overrides; 801 training samples: the last batch of 33 splits 17/16 (shuffled)
    "aggregate": ["method=aggregate"],
    "multihead": ["method=multihead"],
    "dmg": ["method=dmg"],
    "dmg_element": ["method=dmg", "mask.granularity=element"],
    "coral": ["method=coral", "sampler=balanced", "method.forward=joint"],
    "groupdro": ["method=groupdro", "sampler=balanced", "method.forward=joint"],
    "vrex": ["method=vrex", "sampler=balanced", "method.anneal_steps=10"],
    "dann": ["method=dann"],
}
E2E_BASE = [*QUICK, "dataset.max_images=1201", "batch_size=64"]


def torchrun(folder: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    """``torchrun --nproc_per_node=2 launch.py ...`` in ``folder`` (its store and checkpoints land there)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += [str(ROOT / "launch.py"), *overrides, f"tracking.uri=sqlite:///{folder}/mlflow.db"]
    return subprocess.Popen(
        command + [f"checkpoint_dir={folder}/checkpoints"],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, deadline: float = 600) -> tuple[int, str]:
    """The exit status and output; a job still running after ``deadline`` seconds has hung."""
    try:
        output, _ = process.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"the job hung: {process.communicate()[0][-3000:]}") from None
    return process.returncode, output


def metric_rows(folder: Path) -> tuple[list, dict[str, list[tuple[int, float]]]]:
    """The runs of the store in ``folder``, and the metric histories of its only run."""
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("rotated_mnist")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    if len(runs) != 1:
        return runs, {}
    keys = runs[0].data.metrics
    return runs, {
        key: sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key)) for key in keys
    }


def largest_difference(one: dict, two: dict) -> tuple[float, str]:
    """The largest relative difference between two runs' per-epoch metrics, and its key."""
    assert set(one) == set(two)
    worst = (0.0, "")
    for key in one:
        assert [step for step, _ in one[key]] == [step for step, _ in two[key]], key
        for (_, a), (_, b) in zip(one[key], two[key]):
            worst = max(worst, (abs(a - b) / max(abs(a), abs(b), 1e-12), key))
    return worst


def one_process(folder: Path, overrides: list[str], threads: int) -> dict:
    """The per-epoch metrics of a run in this process on ``threads`` CPU threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run(compose_config([*overrides, f"tracking.uri=sqlite:///{folder}/mlflow.db", f"checkpoint_dir={folder}/c"]))
    finally:
        torch.set_num_threads(before)
    return metric_rows(folder)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(E2E))
def test_two_ranks_log_the_metrics_of_one_process(name, tmp_path):
    """``torchrun --nproc_per_node=2`` logs the per-epoch metrics of one process, up to rounding; the run records its
    world size, has one MLflow run and one Hydra output folder.

    Rounding: the ranks add up gradients and BatchNorm statistics in another order, as one process does on another
    number of threads, and training amplifies such differences (Adam normalises small gradients, DMG's mask draws
    compare uniforms with probabilities, and near-chance logits flip their argmax). So the bound is 1e-5 relative or,
    where one process itself moves more than that between 1 and 2 threads, 4 times that (measured here).
    """
    overrides = [*E2E_BASE, *E2E[name]]
    for folder in ("one", "threads", "two"):
        (tmp_path / folder).mkdir()
    (one_run,), one = one_process(tmp_path / "one", overrides, threads=1)  # as each rank (OMP_NUM_THREADS=1)
    _, other_threads = one_process(tmp_path / "threads", overrides, threads=2)
    status, output = finish(torchrun(tmp_path / "two", *overrides))
    assert status == 0, output[-3000:]
    (two_run,), two = metric_rows(tmp_path / "two")
    (difference, key), (floor, floor_key) = largest_difference(one, two), largest_difference(one, other_threads)
    print(f"{name}: 2 ranks {difference:.2e} ({key}); 1 process on 2 threads {floor:.2e} ({floor_key})")
    assert difference <= max(1e-5, 4 * floor), (key, difference, floor)
    assert two_run.data.tags["world_size"] == "2" and one_run.data.tags["world_size"] == "1"
    assert two_run.data.tags["config_hash"] == one_run.data.tags["config_hash"]
    assert len(list((tmp_path / "two" / "outputs").glob("*/*"))) == 1  # rank 0's Hydra folder only


@pytest.mark.slow
def test_kill_9_of_a_rank_stops_the_job_and_the_rerun_continues_it(tmp_path):
    """A rank killed after the first checkpoint ends the whole job (no hang); the same command continues the run:
    one MLflow run, FINISHED, one metric row per epoch."""
    overrides = [*E2E_BASE, "method=aggregate", "epochs=4"]
    job = torchrun(tmp_path, *overrides)
    agent = psutil.Process(job.pid)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "checkpoints").glob("*/last.pt")):
        assert job.poll() is None and time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.2)
    workers = sorted(agent.children(recursive=True), key=lambda p: p.pid)
    for worker in workers:
        worker.suspend()  # neither rank can finish the run before the kill
    victim = next(w for w in workers if "LOCAL_RANK" in w.environ() and w.environ()["LOCAL_RANK"] == "1")
    victim.kill()
    for worker in workers:
        if worker.pid != victim.pid and worker.is_running():
            worker.resume()
    status, output = finish(job, deadline=180)
    assert status != 0
    runs, _ = metric_rows(tmp_path)
    assert len(runs) == 1 and runs[0].info.status in ("KILLED", "FAILED"), output[-3000:]
    status, output = finish(torchrun(tmp_path, *overrides))
    assert status == 0, output[-3000:]
    runs, rows = metric_rows(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [step for step, _ in rows["val/acc_mean"]] == [1, 2, 3, 4]
    assert all(len(history) == len({step for step, _ in history}) for history in rows.values())


# ---- bad input: one line, nothing written --------------------------------------------------------------------


def _written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "outputs" not in p.parts)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batch_size=63"], "batch_size=63 is the global batch, split among 2 processes: it must be a multiple of 2"),
        (["device=cuda"], "device 'cuda' asked for, but PyTorch sees no CUDA GPU here"),
        (["distributed.backend=nccl"], "distributed.backend=nccl needs CUDA GPUs, but this run computes on cpu"),
    ],
)
def test_bad_distributed_input_is_one_line_and_writes_nothing(overrides, message, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    status, output = finish(torchrun(tmp_path, *QUICK, *overrides), deadline=300)
    assert status != 0 and f"error: {message}" in output, output[-3000:]
    assert f'{ROOT / "launch.py"}", line' not in output and f"{ROOT / 'dmg'}" not in output  # no traceback of ours
    assert _written(tmp_path) == []


@pytest.mark.slow
def test_ranks_with_different_configs_stop_with_the_differing_keys(tmp_path):
    """Two tasks started as srun starts them (SLURM's variables only): their configs differ in ``epochs``."""
    environ = {
        **os.environ,
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_ID": str(_slurm_job_id()),
    }
    processes = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), *QUICK, f"epochs={rank + 1}", f"checkpoint_dir={tmp_path}/c"]
            + [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
            cwd=tmp_path,
            env={**environ, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for process in processes:
        status, output = finish(process, deadline=300)
        assert status == 1 and "differing keys: epochs" in output and "Traceback" not in output, output[-3000:]
    assert _written(tmp_path) == []


# ---- SLURM: the launcher recipe --------------------------------------------------------------------------------


def test_the_slurm_ddp_launcher_recipe_composes_with_sweeps_one_task_per_gpu():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            [
                "+sweep=dmg_search_lr",
                "hydra/launcher=slurm_ddp",
                "hydra.launcher.gpus_per_node=8",
                "hydra.launcher.nodes=2",
            ],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == (8, 8, 2)
    assert launcher["max_num_timeout"] == 3  # the slurm recipe's requeues after time limits carry over
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.dmg_sweeps.ResumableOptunaSweeper"
