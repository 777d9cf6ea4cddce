"""Every command that README.md and docs/*.md show is run by a test, so that a documented command is never refused.

The commands are read from the markdown files' code blocks: every line (continuations joined, comments dropped,
shell variables of the same block expanded) whose program is in ``PROGRAMS``. Each one gets a plan by ``plan()``:

- **run**: ``python launch.py`` commands in ``RUN_FOR_REAL`` run as subprocesses, as documented plus tiny overrides
  (``TINY``: one epoch, a few hundred digits, a narrow network, no pretrained weights, small images), on generated
  data in each dataset's format (``DMG_DATA``); then every ``python -m dmg ...`` and ``optuna ...`` command runs
  in-process on what they left (with ``TINY_ARGUMENTS`` appended where it measures speed).
- **composed**: every other ``python launch.py`` command (too slow for 2 cores: 150-epoch recipes, ImageNet
  backbones, grids of 18+ runs) is composed with Hydra's compose API and passes the checks ``launch.py`` makes
  before training (unknown keys, value types, ranges, domain names); a multirun once per swept value.
- **not here**: ``NOT_HERE`` lists, with the reason, what cannot run in a test (a SLURM cluster, a PostgreSQL
  server on another host, installing the package, the suite itself); a composable one among them is still composed.

A documented command that matches no plan fails ``test_every_documented_command_has_a_plan`` with its file and line:
extend ``RUN_FOR_REAL``, ``TINY_ARGUMENTS`` or ``NOT_HERE`` for it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, ListConfig

from dmg.__main__ import main as dmg_main
from dmg.data.domains import choose_domains
from dmg.data.synthetic import write_domainnet, write_image_tree, write_pacs_hdf5, write_pacs_kfold
from dmg.runs.settings import check_overrides, check_settings
from tests.conftest import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = {"python", "python3", "torchrun", "mlflow", "optuna", "pip", "pytest", "sbatch", "srun", "createdb"}


@dataclass(frozen=True)
class Documented:
    """One command as a document shows it (shell variables of its code block expanded)."""

    where: str  # file:line
    words: tuple[str, ...]

    @property
    def text(self) -> str:
        return shlex.join(self.words)


def code_lines(markdown: str):
    """``(line number, line)`` of every fenced code block's lines, continuation lines joined."""
    for block in re.finditer(r"^```[^\n]*\n(.*?)^```", markdown, re.S | re.M):
        first = markdown.count("\n", 0, block.start(1)) + 1
        pending, start = "", first
        for offset, line in enumerate(block.group(1).splitlines()):
            if not pending:
                start = first + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield start, pending + line
            pending = ""


def commands_of(path: Path) -> list[Documented]:
    commands, variables = [], {}
    for number, line in code_lines(path.read_text()):
        first = line.split()[:1]
        if not first or not (first[0] in PROGRAMS or first[0] == "export" or re.match(r"[A-Z_]+=", first[0])):
            continue  # not a shell command: a folder tree, Python, a shell loop's own line
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            words = words[1:]
        if len(words) == 1 and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            name, _, value = words[0].partition("=")
            variables[name] = re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), value)
            continue
        words = [re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), word) for word in words]
        words = " ".join(words).split()  # a variable may hold several words ($COMMON)
        if ">" in words:
            words = words[: words.index(">")]  # the output file of a redirection is the reader's
        if words[-1:] == ["&"]:
            words = words[:-1]
        if words and words[0] in PROGRAMS:
            commands.append(Documented(f"{path.relative_to(ROOT)}:{number}", tuple(words)))
    return commands


def documented_commands() -> list[Documented]:
    return [command for path in DOCUMENTS for command in commands_of(path)]


# ---- plans ---------------------------------------------------------------------------------------------------------

# (pattern searched in the command, why it cannot run in a test); a launch.py command among them is still composed
NOT_HERE = [
    (r"^pip install", "installs the package into the environment (.ci/run does it)"),
    (r"^pytest", "the test suite itself"),
    (r"^createdb ", "creates databases on a PostgreSQL server at db-host (tests/test_postgres.py starts its own)"),
    (r"^sbatch ", "submits to a SLURM cluster"),
    (r"^srun ", "starts ranks on a SLURM cluster (tests/test_distributed.py starts ranks as srun would)"),
    (r"^python -m dmg bench gpu", "measures GPUs (tests/test_bench_gpu.py runs it on the CPU with tiny settings)"),
    (r"^torchrun ", "one rank per GPU (tests/test_distributed.py runs launch.py under torchrun with 2 CPU ranks)"),
    (r"postgresql://", "needs the PostgreSQL server at db-host (tests/test_postgres.py covers PostgreSQL stores)"),
    (r"mlflow-host", "needs the MLflow server on mlflow-host"),
    (r"--experiment pacs --tag study=\.\.\.", "its study=... stands for a PACS study; the test sweeps Rotated MNIST"),
    (r"hydra/launcher=slurm", "submits SLURM jobs (the launcher runs locally in tests/test_sweeps.py)"),
    (r"--decode gpu|dataset\.decode=gpu", "decodes JPEGs on a GPU (nvJPEG)"),
    (
        r"^mlflow ui --backend-store-uri sqlite:///mlflow\.db$",
        "a server that runs until stopped: tests/test_mlflow_ui.py starts it on a launch.py store and follows the "
        "README's way to the runs table in Chromium",
    ),
]

# launch.py commands run for real (as documented, plus TINY), in this order
RUN_FOR_REAL = [
    "python launch.py dataset.max_images=1200 epochs=2",
    "python launch.py dataset=pacs method=dmg target=sketch",
    "python launch.py dataset=imagefolder dataset.root=/data/mine dataset.num_classes=12 target=winter",
    "python launch.py -m +sweep=dmg_search target=rot30",
]

# Appended to a launch.py command, where the composed config has the key: the cheapest run that still trains
TINY = {
    "epochs": "1",
    "progress": "false",
    "num_workers": "0",
    "batch_size": "16",
    "dataset.max_images": "600",
    "backbone.network.width": "4",
    "backbone.pretrained": "false",
    "dataset.image_size": "32",
    "dataset.resize_size": "32",
}
TINY_SWEEP = ["hydra.sweeper.n_trials=2"]

# python -m dmg <command> [<subcommand>]: arguments appended to make it cheap (argparse: the last value wins)
TINY_ARGUMENTS = {
    ("report",): [],
    ("prepare", "domainnet"): [],
    ("bench",): ["--methods", "aggregate", "dmg", "--batch-size", "8", "--image-size", "64", "--warmup", "0"]
    + ["--repeats", "1"],
    ("bench", "train"): ["--backbones", "resnet18", "--methods", "aggregate", "--images-per-domain", "8"]
    + ["--image-size", "32", "--batch-size", "8", "--eval-batch-size", "8", "--workers", "0", "--epochs", "2"]
    + ["--compute-batches", "1"],
}
OPTUNA_COMMANDS = {"studies", "trials", "best-trial"}

# documented placeholders for the reader's own values, and what stands for them here ({data}: DMG_DATA)
PLACEHOLDERS = {
    "$rank": "0",  # docs/sweeps.md's shell loop variable
    "$DMG_DATA": "{data}",
    "/datasets/": "{data}/",
    "/data/mine": "{data}/imagefolder",
    "/elsewhere/PACS": "{data}/PACS",
    # docs/methods.md's grid writes there; here the runs above wrote into the working folder's store
    "sqlite:///results/mlflow.db": "sqlite:///mlflow.db",
}


def filled(words, data: Path) -> list[str]:
    """``words`` with the documented placeholders replaced by what stands for them in the test."""
    out = []
    for word in words:
        for placeholder, value in PLACEHOLDERS.items():
            word = word.replace(placeholder, value.format(data=data))
        out.append(word)
    return out


@dataclass(frozen=True)
class Plan:
    kind: str  # "run", "call" (in-process), "composed", "not here"
    why: str = ""


def plan(command: Documented) -> Plan | None:
    """How the test covers ``command``; None when it does not know (the command then fails the first test)."""
    text, words = command.text, command.words
    for pattern, why in NOT_HERE:
        if re.search(pattern, text):
            return Plan("composed" if is_launch(words) else "not here", why)
    if is_launch(words):
        run = " ".join(words) in RUN_FOR_REAL
        return Plan("run" if run else "composed", "" if run else "a long run: composed and checked")
    if words[:3] == ("python", "-m", "dmg") and dmg_arguments(words[3:]) is not None:
        return Plan("call")
    if words[0] == "optuna" and words[1:2] and words[1] in OPTUNA_COMMANDS:
        return Plan("call")
    return None


def launch_words(words) -> tuple[str, ...] | None:
    """``python launch.py <overrides>`` of a command that runs launch.py directly or under torchrun or srun."""
    if "launch.py" not in words:
        return None
    at = words.index("launch.py")
    if (words[0] in ("python", "python3") and at == 1) or words[0] in ("torchrun", "srun"):
        return ("python", "launch.py", *words[at + 1 :])
    return None


def is_launch(words) -> bool:
    return launch_words(words) is not None


def dmg_arguments(arguments) -> list[str] | None:
    """``python -m dmg`` arguments plus their tiny ones; None for a command not in TINY_ARGUMENTS."""
    for key in TINY_ARGUMENTS:
        rest = arguments[len(key) :]
        if tuple(arguments[: len(key)]) == key and not (rest and not rest[0].startswith("-")):
            return [*arguments, *TINY_ARGUMENTS[key]]
    return None  # another command or subcommand (python -m dmg bench gpu): not known here


def test_every_documented_command_has_a_plan():
    commands = documented_commands()
    texts = [" ".join(c.words) for c in commands]
    # the extraction finds what the documents show: a command of the README, of a doc page, a continued line
    assert "python launch.py dataset.max_images=1200 epochs=2" in texts
    assert "python -m dmg report --experiment rotated_mnist --overlap" in texts
    assert any(
        t.startswith("python launch.py -m +sweep=leave_one_out dataset=pacs backbone=resnet18 method=") for t in texts
    )
    assert set(RUN_FOR_REAL) <= set(texts), set(RUN_FOR_REAL) - set(texts)
    unknown = [f"{c.where}: {c.text}" for c in commands if plan(c) is None]
    assert not unknown, (
        "documented commands this test does not know how to run; add them to RUN_FOR_REAL, TINY_ARGUMENTS or "
        "NOT_HERE (with the reason) in tests/test_documented_commands.py:\n  " + "\n  ".join(unknown)
    )


def test_a_command_this_test_does_not_know_gets_no_plan():
    unknown = [
        "mpirun -n 2 python launch.py epochs=1",
        "python -m dmg bench nothing",
        "mlflow gc",
        "optuna create",
    ]
    for text in unknown:
        assert plan(Documented("doc.md:1", tuple(text.split()))) is None, text
    known = plan(Documented("doc.md:1", ("python", "-m", "dmg", "bench", "--backbone", "alexnet")))
    assert known == Plan("call")


# ---- composed ------------------------------------------------------------------------------------------------------


def launch_overrides(words) -> tuple[list[str], bool]:
    """The Hydra overrides of a ``python launch.py`` command and whether it is a multirun."""
    overrides = list(launch_words(words)[2:])
    multirun = any(flag in overrides for flag in ("-m", "--multirun"))
    return [word for word in overrides if word not in ("-m", "--multirun")], multirun


def single_jobs(overrides: list[str]) -> list[list[str]]:
    """Jobs covering every value of every swept key once (the first value of the others): not the full product."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = []
    for index, override in enumerate(parsed):
        if override.is_sweep_override():
            try:
                values = list(override.sweep_string_iterator())
            except Exception:  # noqa: BLE001 - an Optuna range such as interval(): the sweeper samples it
                values = []
            swept.append((index, values))
    base = [o.input_line for o in parsed]
    first = {index: values[0] for index, values in swept if values}
    for index, values in swept:
        base[index] = f"{parsed[index].get_key_element()}={first[index]}" if values else None
    jobs = [[o for o in base if o is not None]]
    for index, values in swept:
        for value in values[1:]:
            job = list(base)
            job[index] = f"{parsed[index].get_key_element()}={value}"
            jobs.append([o for o in job if o is not None])
    return jobs


def compose_job(overrides: list[str], folder: Path) -> DictConfig:
    """Compose one job as launch.py would (with its sweep recipe and launcher), then make launch.py's checks."""
    isolated = [f"tracking.uri=sqlite:///{folder}/mlflow.db", f"checkpoint_dir={folder}/checkpoints"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, *isolated], return_hydra_config=True)
        task = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
        check_overrides(cfg, task)
    check_settings(cfg)
    domains = cfg.dataset.get("domains")
    if isinstance(domains, (ListConfig, DictConfig)):
        choose_domains(list(domains), cfg.target, cfg.sources)
    return cfg


COMMANDS = documented_commands()


@pytest.mark.slow  # about a second per command on 2 cores
@pytest.mark.parametrize(
    "command",
    [c for c in COMMANDS if is_launch(c.words)],
    ids=lambda c: f"{c.where} {' '.join(launch_words(c.words)[2:])}",
)
def test_documented_launch_commands_compose_and_pass_launchs_checks(command, tmp_path):
    overrides, _ = launch_overrides(filled(command.words, tmp_path))
    for job in single_jobs(overrides):
        compose_job(job, tmp_path)


# ---- run -----------------------------------------------------------------------------------------------------------

PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
IMAGEFOLDER_DOMAINS = ["a", "b", "c", "winter"]  # the domains the docs' imagefolder commands name
DOMAINNET_DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]


def generated_data(root: Path) -> Path:
    """``DMG_DATA`` with small datasets in the documented formats: PACS's HDF5 files and kfold images, a
    DomainBed-style folder of 12 classes and DomainNet's image tree with its official lists."""
    write_pacs_hdf5(root / "PACS", PACS_DOMAINS, {"train": 8, "val": 4, "test": 4}, size=32)
    write_pacs_kfold(root / "PACS", PACS_DOMAINS, [f"class{i}" for i in range(7)], per_class=2)
    write_image_tree(root / "imagefolder", IMAGEFOLDER_DOMAINS, [f"class{i}" for i in range(12)], 2)
    write_domainnet(root / "DomainNet", DOMAINNET_DOMAINS, ["airplane", "apple", "axe"], per_class=4)
    return root


def tiny_launch(words, data: Path) -> list[str]:
    """The documented launch.py command with its data root on the generated data and TINY appended."""
    overrides, multirun = launch_overrides(words)
    overrides = [o for o in overrides if not o.startswith("dataset.root=")]  # $DMG_DATA/<folder> is generated
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=single_jobs(overrides)[0], return_hydra_config=True)
    tiny = [f"{key}={value}" for key, value in TINY.items() if _has(cfg, key)]
    sweep = TINY_SWEEP if any(o == "+sweep=dmg_search" for o in overrides) else []
    return [sys.executable, str(ROOT / "launch.py"), *(["-m"] if multirun else []), *overrides, *tiny, *sweep]


def _has(cfg: DictConfig, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
    return True


def call(words, cwd: Path, monkeypatch) -> tuple[int, str]:
    """A ``python -m dmg`` command in this process (``optuna``'s, a subprocess), in ``cwd``: exit status, output."""
    if words[0] == "optuna":
        optuna = str(Path(sys.executable).with_name("optuna"))
        done = subprocess.run([optuna, *words[1:]], cwd=cwd, capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout + done.stderr
    out = io.StringIO()
    monkeypatch.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = dmg_main(dmg_arguments(words[3:]))
    except SystemExit as stop:
        status = stop.code or 0
    return status, out.getvalue()


@pytest.mark.slow
def test_representative_documented_commands_run_to_the_end(tmp_path, monkeypatch):
    """RUN_FOR_REAL as subprocesses (tiny overrides, generated data), then every ``python -m dmg`` and ``optuna``
    command of the docs in-process on the runs, sweep and data they left."""
    data = generated_data(tmp_path / "data")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "DMG_DATA": str(data), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    by_text = {" ".join(c.words): c for c in COMMANDS}
    refused = []  # every failing command is listed, not only the first
    for text in RUN_FOR_REAL:
        argv = tiny_launch(by_text[text].words, data)
        done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            refused.append(f"{by_text[text].where}: {shlex.join(argv[1:])}\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    finished = client.search_runs([e.experiment_id for e in client.search_experiments()], "status = 'FINISHED'")
    ran = {(r.data.tags["dataset"], r.data.tags["target"]) for r in finished if "dataset" in r.data.tags}
    for command in (c for c in COMMANDS if plan(c).kind == "call"):
        status, output = call(filled(command.words, data), work, monkeypatch)
        if status:
            refused.append(f"{command.where}: {command.text}\n{output[-1500:]}")
    assert not refused, "documented commands that failed:\n" + "\n".join(refused)
    # one finished single run per command run for real, and two sweep trials
    assert ran == {("rotated_mnist", "rot30"), ("pacs", "sketch"), ("imagefolder", "winter")}
    assert len(finished) == 3 + 1 + 2  # the three single runs, the sweep's parent run and its two trials
