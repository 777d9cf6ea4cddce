"""Bad input of every kind (docs/errors.md lists them): one line naming the key, what was expected and the fix,
raised before anything is written; from the command line, exit status 1 and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir

from dmg.errors import UserError
from dmg.runs.experiment import run
from dmg.runs.settings import check_overrides
from tests.conftest import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A ResNet-18 state_dict, a file that is not a checkpoint, and a file where a folder is expected."""
    folder = tmp_path_factory.mktemp("files")
    torch.save(torchvision.models.resnet18().state_dict(), folder / "resnet18.pth")
    (folder / "garbage.pth").write_bytes(b"not a checkpoint")
    (folder / "garbage.db").write_bytes(b"not a database, just text" * 10)
    (folder / "a_file").write_text("")
    return folder


BAD_INPUT = [
    # (overrides, the message it must contain); {files}: the fixture's folder
    (["target=rot90"], "unknown domain 'rot90': this dataset's domains are rot0, rot15"),
    (["target=15"], "unknown domain '15'"),
    (["target=[]"], "no target domain given"),
    (["target=rot30", "sources=[rot0,rot30]"], "rot30 also listed as source: a target must be unseen"),
    (["sources=[rot0,rot0,rot15]"], "sources names rot0 more than once: list each domain once"),
    (["target=[rot30,rot30]"], "target names rot30 more than once: list each domain once"),
    (
        ["optimized_metric=val/acc"],
        "optimized_metric must be a summary metric this run logs, got 'val/acc'; did you mean selected/val/acc/rot0?",
    ),
    (["method=aggregate", "optimized_metric=selected/test/acc/rot99"], "it logs selected/val/acc/rot0, selected/"),
    (["averaging=swad", "optimized_metric=averaged/first_epochs"], "did you mean averaged/first_epoch?"),
    (["backbone.mask_layers=[conv9]"], "unknown layer 'conv9': this backbone's layers are conv1, pool1"),
    (["backbone.mask_layers=[fc,fc]"], "mask_layers must name distinct layers"),
    (["backbone.mask_layers=fc"], "backbone.mask_layers must be a list such as [a,b] (default: [conv3, fc]), got 'fc'"),
    (["method=multihead", "backbone.split_layer=head"], "unknown layer 'head'"),
    (
        ["backbone=resnet18", "backbone.weights=/nonexistent/resnet18.pth"],
        "weights file /nonexistent/resnet18.pth not found",
    ),
    (["backbone=resnet18", "backbone.weights={files}/garbage.pth"], "could not be read as a PyTorch state_dict"),
    (["backbone=resnet18", "backbone.weights={files}"], "backbone.weights={files}: {files} is a folder; name the"),
    (
        ["backbone=resnet50", "backbone.weights={files}/resnet18.pth"],
        "does not fit resnet50: 198 of the 320 keys it needs are missing, 0 unexpected, 24 of another shape; "
        "it looks like a resnet18 state_dict",
    ),
    (
        ["backbone=alexnet"],
        "backbone alexnet cannot take 28x28 images (the smallest it takes is 63 px): set dataset.image_size=63",
    ),
    (["epochs=0"], "epochs must be an integer >= 1, got 0"),
    (["epochs=2.5"], "epochs must be an integer (default: 20), got 2.5"),
    (["batch_size=-1"], "batch_size must be an integer >= 1, got -1"),
    (["eval_batch_size=0"], "eval_batch_size must be an integer >= 1, got 0"),
    (["seed=abc"], "seed must be an integer (default: 0), got 'abc'"),
    (["num_workers=-2"], "num_workers must be an integer >= 0, got -2"),
    (["drop_last=maybe"], "drop_last must be true or false (default: False), got 'maybe'"),
    (["device=tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["resume=sometimes"], "resume must be one of auto, skip_finished, never, got 'sometimes'"),
    (["keep_checkpoints=most"], "keep_checkpoints must be one of selected, all, none, got 'most'"),
    (["+epoch=3"], "unknown setting 'epoch': did you mean epochs? the top-level keys are backbone, method"),
    (["+dataset.max_image=10"], "unknown setting 'dataset.max_image': did you mean max_images?"),
    (["optim.lr=abc"], "optim.lr must be a number (default: 0.001), got 'abc'"),
    (["optim.lr=-1"], "bad optim.network setting (torch.optim.Adam): Invalid learning rate: -1"),
    (["optim.mask_weight_decay=-0.5"], "bad optim.masks setting (torch.optim.Adam): Invalid weight_decay value: -0.5"),
    (["method.overlap_lambda=-1"], "method.overlap_lambda must be a finite number >= 0, got -1"),
    (["method.overlap_lambda=nan"], "method.overlap_lambda must be a finite number >= 0, got nan"),
    (["method.sparsity_lambda=inf"], "method.sparsity_lambda must be a finite number >= 0, got inf"),
    (["method.ood_mode=vote"], "ood_mode must be one of ensemble, avg_mask, got 'vote'"),
    (["mask=scalar", "mask.val=abc"], "mask.val must be a number (default: 1.0), got 'abc'"),
    (["dataset.max_images=5"], "dataset.builder.max_images must be an integer >= 12, got 5"),
    (["sampler=random"], "sampler must be one of shuffled, balanced, got 'random'"),
    (["sampler=balanced", "batch_size=3"], "batch_size must be at least the number of source domains (5)"),
    (["mask.granularity=pixel"], "mask.granularity must be one of channel, element, got 'pixel'"),
    (["optim.schedule_masks=maybe"], "optim.schedule_masks must be true or false (default: False), got 'maybe'"),
    (["averaging=swad", "averaging.n_converge=0"], "averaging.n_converge must be an integer >= 1, got 0"),
    (["averaging=swad", "averaging.tolerance_ratio=-1"], "averaging.tolerance_ratio must be a finite number >= 0"),
    (["method=coral", "method.penalty_weight=-1"], "method.penalty_weight must be a finite number >= 0, got -1"),
    (["method=mmd", "method.kernel_gammas=[1,0]"], "method.kernel_gammas must be a finite number > 0, got 0"),
    (["method=dann", "method.discriminator_depth=1"], "method.discriminator_depth must be an integer >= 2, got 1"),
    (["method=dann", "method.discriminator_dropout=1.0"], "method.discriminator_dropout must be a number in [0, 1)"),
    (["method=mixup", "method.alpha=0"], "method.alpha must be a finite number > 0, got 0"),
    (["method=groupdro", "method.eta=-0.1"], "method.eta must be a finite number >= 0, got -0.1"),
    (["method=coral"], "method.forward=per_domain (one forward pass per source domain, as DomainBed) needs sampler="),
    (["method=mixup", "sampler=balanced"], "multiple of the 5 source domains, got sampler=balanced batch_size=64: use"),
    (["method=mmd", "method.forward=sideways"], "method.forward must be joint or per_domain, got 'sideways'"),
    (["backbone.freeze_bn=maybe"], "backbone.freeze_bn must be true or false (default: False), got 'maybe'"),
    (["method=irm", "method.anneal_steps=-5"], "method.anneal_steps must be an integer >= 0, got -5"),
    (["method=vrex", "method.penalty_weight=nan"], "method.penalty_weight must be a finite number >= 0, got nan"),
    (["method=mixstyle", "method.layers=[fc]"], "method.layers must be a list of stages before the last one (fc)"),
    (["method=mixstyle", "method.p=2"], "method.p must be a probability in [0, 1], got 2"),
    (["dataset.image_size=0"], "dataset.builder.image_size must be an integer >= 1, got 0"),
    (
        ["checkpoint_dir={files}/a_file/checkpoints"],
        "checkpoint_dir={files}/a_file/checkpoints: {files}/a_file is a file, not a folder",
    ),
    (
        ["tracking.uri=bogus://somewhere"],
        "tracking.uri=bogus://somewhere: unknown store scheme 'bogus'; expected a store URI",
    ),
    (["tracking.uri=sqlite:///{files}/garbage.db"], "{files}/garbage.db is not a SQLite database"),
    (
        ["tracking.uri=sqlite:///{files}/a_file/mlflow.db"],
        "cannot create files in {files}/a_file; use a writable folder",
    ),
    (["tracking.uri=sqlite:///{files}"], "is a folder; name a database file, e.g. sqlite:///mlflow.db"),
    (
        ["tracking.uri=mlflow.db"],
        "tracking.uri=mlflow.db: a plain path is MLflow's retired file store, not a database; "
        "for SQLite write sqlite:///mlflow.db",
    ),
    (
        ["tracking.uri=sqlite://mlflow.db"],
        "tracking.uri=sqlite://mlflow.db: not the form of a SQLite URI; expected sqlite:///mlflow.db (three slashes "
        "before a relative path, four before an absolute one)",
    ),
    (["tracking.uri=http://127.0.0.1:9"], "tracking.uri=http://127.0.0.1:9: no MLflow server answers there"),
    (["tracking.uri=postgresql://user@localhost/db"], "the database driver is not installed"),
    (
        ["tracking.uri=mysql+pymysql://user@localhost/db"],
        'installed (import of pymysql halted; None in sys.modules); for MySQL and MariaDB: pip install -e ".[mysql]"',
    ),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUT, ids=[" ".join(case[0]) for case in BAD_INPUT])
def test_bad_input_is_one_line_naming_the_key_before_anything_is_written(
    tmp_path, files, overrides, message, monkeypatch
):
    for driver in ("psycopg2", "pymysql") if "sql://" in overrides[0] else ():  # the driver missing: not importable
        monkeypatch.setitem(sys.modules, driver, None)
    store = tmp_path / "store"
    settings = ["dataset.max_images=120", f"tracking.uri=sqlite:///{store}/mlflow.db", f"checkpoint_dir={store}/ckpt"]
    overrides = settings + [override.format(files=files) for override in overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        with pytest.raises(UserError) as caught:
            check_overrides(cfg, overrides)
            run(cfg)
    assert message.format(files=files) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not store.exists()  # no store, no run, no checkpoint folder


def launch(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    flags = [option for option in overrides if option.startswith("-")]  # -m goes before the overrides
    settings = [option for option in overrides if not option.startswith("-")]
    command = [sys.executable, str(ROOT / "launch.py"), *flags, "dataset.max_images=120", "progress=false", *settings]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def only_error_line(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip() and "INFO" not in line]
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+epoch=3"], "unknown setting 'epoch': did you mean epochs?"),
        (["tracking.uri=http://127.0.0.1:9"], "no MLflow server answers there"),
        (
            ["-m", "+sweep=dmg_search", "hydra.sweeper.n_trials=0"],
            "hydra.sweeper.n_trials must be an integer >= 1, got 0",
        ),
        (["-m", "+sweep=dmg_search", "+epochz=1"], "unknown setting 'epochz': did you mean epochs?"),
    ],
)
def test_the_command_line_prints_one_line_exits_1_and_writes_nothing(tmp_path, overrides, message):
    line = only_error_line(launch(tmp_path, *overrides))
    assert message in line
    assert not [path.name for path in tmp_path.iterdir() if path.name not in ("outputs", "multirun")]


def refused_after_hydra_made_its_folder(tmp_path: Path, *overrides: str) -> str:
    """``launch.py`` on a DomainBed-style folder whose domains are ``a`` and ``b`` (no images), asked for target
    ``c``: refused when the data is read, after Hydra made the run's output folder. Returns the one line."""
    for domain in ("a", "b"):
        (tmp_path / "data" / domain / "cat").mkdir(parents=True, exist_ok=True)
    settings = ["dataset=imagefolder", f"dataset.root={tmp_path / 'data'}", "dataset.num_classes=2", "target=c"]
    command = [sys.executable, str(ROOT / "launch.py"), *settings, "progress=false", *overrides]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return only_error_line(result)


def test_a_single_run_refused_after_hydra_made_its_folder_removes_it(tmp_path):
    line = refused_after_hydra_made_its_folder(tmp_path)
    assert line.endswith("error: unknown domain 'c': this dataset's domains are a, b")
    assert not list((tmp_path / "outputs").iterdir())  # neither outputs/<date>/<time>/ nor the date folder
    refused_after_hydra_made_its_folder(tmp_path, "hydra.run.dir=run")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "outputs"]  # the working directory stays


def test_a_refused_runs_folder_holding_anything_else_is_kept(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    refused_after_hydra_made_its_folder(tmp_path, "hydra.run.dir=run")
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [".hydra", "launch.log", "notes.txt"]


@pytest.mark.slow
def test_a_bad_job_of_a_leave_one_out_sweep_prints_one_line_and_the_others_finish(tmp_path):
    result = launch(tmp_path, "-m", "+sweep=leave_one_out", "target=rot99,rot0", "seed=0", "epochs=1")
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    failures = [line for line in output.splitlines() if "failed" in line]
    assert len(failures) == 2 and "target=rot99" in failures[0], output
    assert failures[0].endswith(
        "failed: unknown domain 'rot99': this dataset's domains are rot0, rot15, rot30, rot45, rot60, rot75"
    )
    assert failures[1].endswith("1 of 2 jobs failed; rerun the same command once fixed: finished jobs are skipped")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("rotated_mnist").experiment_id])
    assert [(r.data.tags["target"], r.info.status) for r in runs] == [("rot0", "FINISHED")]


@pytest.mark.parametrize(
    "override, message",
    [
        ("hydra.sweeper.n_trials=-1", "hydra.sweeper.n_trials must be an integer >= 1, got -1"),
        ("hydra.sweeper.n_jobs=0", "hydra.sweeper.n_jobs must be an integer >= 1, got 0"),
        ("hydra.sweeper.direction=up", "hydra.sweeper.direction must be maximize or minimize, got 'up'"),
        ("hydra.sweeper.grace_period=-5", "hydra.sweeper.grace_period must be a finite number > 0, got -5"),
        ("hydra.sweeper.max_consecutive_failures=0", "max_consecutive_failures must be an integer >= 1, got 0"),
    ],
)
def test_sweeper_options_are_checked_before_a_sweep_starts(override, message):
    from dmg.sweeps.callbacks import check_sweeper

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=dmg_search", override], return_hydra_config=True)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_sweeper(cfg.hydra.sweeper)


def test_a_sqlite_store_on_a_network_file_system_gets_a_warning(tmp_path, caplog):
    from dmg.runs.stores import warn_if_network_file_system

    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda1 / ext4 rw 0 0\nfiler:/export/lab {tmp_path}/shared nfs4 rw,relatime 0 0\n")
    (tmp_path / "shared" / "project").mkdir(parents=True)
    warn_if_network_file_system(tmp_path / "local.db", "tracking.uri", mounts)
    assert not caplog.records
    warn_if_network_file_system(tmp_path / "shared" / "project" / "mlflow.db", "tracking.uri", mounts)
    assert "is on a network file system (nfs4), where SQLite locking is unreliable" in caplog.text
