"""The MLflow UI as a user meets it: ``mlflow ui`` starts on a store written by ``launch.py`` with the pinned packages,
and in Chromium (driven by Playwright, on a fresh browser profile) the README's way to the runs table, followed word
for word, reaches it. The same code takes the pictures in the docs:
``pytest tests/test_mlflow_ui.py -k screenshots --screenshots docs/images``.

Chromium is the system's (Debian's ``chromium`` package; ``DMG_CHROMIUM`` names another binary): Playwright's own
browser download is not used. Without a browser the browser tests are skipped, except in CI (``CI`` set), where
``.ci/run`` installs one and a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import QUICK
from tests.mlflow_server import api, mlflow_ui

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# the README's URLs name MLflow's default address; the tests serve on a free port
README_ADDRESS = "http://127.0.0.1:5000"
CLICK_TIMEOUT_MS = 60_000  # a deadline that catches a click nothing answers (a busy machine renders slowly)
MAX_PICTURE_BYTES = 300_000


def launch(store: Path, *overrides: str) -> None:
    """``python launch.py <overrides>`` in ``store``: its MLflow store, checkpoints, Hydra and sweep folders."""
    isolated = [f"tracking.uri=sqlite:///{store}/mlflow.db", f"checkpoint_dir={store}/checkpoints"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *overrides, *isolated],
        cwd=store,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def chromium_or_skip() -> str:
    """The Chromium binary to drive, or a skip with the reason (a failure in CI, where one must be installed)."""
    missing = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[dev]')"
    binary = os.environ.get("DMG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if missing is None and binary is None:
        missing = "no Chromium browser found (apt-get install chromium, or set DMG_CHROMIUM)"
    if missing and os.environ.get("CI"):
        pytest.fail(f"{missing}; CI must run the browser tests (.ci/run installs them)")
    if missing:
        pytest.skip(missing)
    return binary


@pytest.fixture(scope="module")
def browser():
    binary = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox cannot start as root in a container
        chromium = playwright.chromium.launch(executable_path=binary, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def fresh_page(browser):
    """A page in a new browser context: a first visit (no cookies, no local storage, no dismissed tips)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(CLICK_TIMEOUT_MS)
    yield context.new_page()
    context.close()


@pytest.fixture(scope="module")
def one_run_store(tmp_path_factory) -> Path:
    """A store holding one small ``launch.py`` run (DMG on the embedded Rotated MNIST)."""
    store = tmp_path_factory.mktemp("ui")
    launch(store, *QUICK, "epochs=1")
    return store


@pytest.fixture(scope="module")
def one_run_ui(one_run_store):
    with mlflow_ui(one_run_store) as base_url:
        yield base_url


@pytest.mark.slow
def test_mlflow_ui_serves_the_runs_of_the_project_store(one_run_ui):
    experiment = api(one_run_ui, "experiments/get-by-name?experiment_name=rotated_mnist")["experiment"]
    runs = api(one_run_ui, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert [r["info"]["status"] for r in runs] == ["FINISHED"]
    assert {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}["method"] == "dmg"


def readme_way_to_the_runs_table() -> tuple[str, list[str]]:
    """What the README says after ``To see the runs:``: the runs table's URL, and the names to click from the home
    page (in bold, in order, between "From the home page" and "Runs are named")."""
    text = README.read_text()
    start = text.index("To see the runs:")
    section = text[start : text.index("\n## ", start)]
    url = re.search(r"`(http://127\.0\.0\.1:5000/#/experiments/<experiment id>/runs)`", section)
    assert url, "the README no longer gives the runs table's URL (…/#/experiments/<experiment id>/runs)"
    clicks = re.search(r"From the home page(.*?)Runs are named", section, re.S)
    assert clicks, "the README no longer says how to reach the runs table from the home page"
    return url.group(1), re.findall(r"\*\*(.+?)\*\*", clicks.group(1))


def only_run(base_url: str) -> tuple[str, str]:
    """The experiment id and run name of the store's single run, as MLflow's API gives them."""
    experiment = api(base_url, "experiments/get-by-name?experiment_name=rotated_mnist")["experiment"]
    (run,) = api(base_url, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    return experiment["experiment_id"], run["info"]["run_name"]


def expect_runs_table(page, run_name: str) -> None:
    """The page is an experiment's runs table listing ``run_name``."""
    page.get_by_text(run_name, exact=True).first.wait_for(state="visible")
    assert re.search(r"#/experiments/\d+/runs", page.url), page.url
    assert page.get_by_text("matching run").first.is_visible()


@pytest.mark.slow
def test_the_readmes_url_opens_the_runs_table_on_a_first_visit(one_run_ui, fresh_page):
    url, _ = readme_way_to_the_runs_table()
    experiment_id, run_name = only_run(one_run_ui)
    fresh_page.goto(url.replace(README_ADDRESS, one_run_ui).replace("<experiment id>", experiment_id))
    expect_runs_table(fresh_page, run_name)


@pytest.mark.slow
def test_the_readmes_clicks_from_the_home_page_reach_the_runs_table_on_a_first_visit(one_run_ui, fresh_page):
    _, clicks = readme_way_to_the_runs_table()
    assert clicks, "the README names nothing to click"
    _, run_name = only_run(one_run_ui)
    fresh_page.goto(one_run_ui)
    for name in clicks:
        fresh_page.get_by_text(name, exact=True).first.click()
    expect_runs_table(fresh_page, run_name)


SUMMARY_PREFIXES = ("averaged", "last", "online", "selected")  # the run's summary, logged once (dmg/runs/summary.py)
CURVES_SEARCH = "^(lr|mask|test|train|val)/"  # README.md: what to type in "Search metric charts" for the curves alone
SECTION_HEADER = "experiment-view-compare-runs-section-header"


def chart_sections(page) -> list[str]:
    """The names of the chart sections on ``page``, top to bottom, once they are drawn."""
    headers = page.get_by_test_id(SECTION_HEADER)
    headers.first.wait_for(state="visible")
    return [text.splitlines()[0].strip() for text in headers.all_inner_texts()]


def metric_sections(run: dict) -> list[str]:
    """The sections of a run's metrics (a run as MLflow's API gives it) in alphabetical order: one per key without
    its last part (``val/acc`` holds ``val/acc/rot0``)."""
    keys = [metric["key"] for metric in run["data"]["metrics"]]
    return sorted({key.rpartition("/")[0] for key in keys if "/" in key})


@pytest.mark.slow
def test_chart_sections_are_in_alphabetical_order_with_the_summaries_among_the_curves(one_run_ui, fresh_page):
    """What README.md says of the chart view: MLflow 3.16 sorts its sections by name, so the summaries (``last/``,
    ``selected/``, ...) are among the per-epoch curves (``lr/``, ``mask/``, ``test/``, ``train/``, ``val/``) and the
    first section is a summary's; the README's search shows the curves alone."""
    from playwright.sync_api import expect

    experiment_id, _ = only_run(one_run_ui)
    (run,) = api(one_run_ui, "runs/search", {"experiment_ids": [experiment_id]})["runs"]
    expected = metric_sections(run)
    views = {
        "a run's Model metrics tab": f"#/experiments/{experiment_id}/runs/{run['info']['run_id']}/model-metrics",
        "the experiment's chart view": f"#/experiments/{experiment_id}/runs?compareRunsMode=CHART",
    }
    for view, route in views.items():
        fresh_page.goto(f"{one_run_ui}/{route}")
        sections = chart_sections(fresh_page)
        assert sections[: len(expected)] == expected, view
        assert set(sections[len(expected) :]) <= {"Model metrics", "System metrics"}, view  # MLflow's own, last
        assert sections[0].split("/")[0] in SUMMARY_PREFIXES, view
        fresh_page.get_by_placeholder("Search metric charts").fill(CURVES_SEARCH)
        curves = [name for name in expected if name.split("/")[0] not in SUMMARY_PREFIXES]
        expect(fresh_page.get_by_test_id(SECTION_HEADER)).to_have_count(len(curves))
        assert chart_sections(fresh_page) == curves, view


# ---- the pictures in the docs -------------------------------------------------------------------------------------

# quick runs (the pictures in the docs are of these too): 3 epochs of single runs, 1 epoch per trial
PICTURE_RUNS = [*QUICK, "epochs=3"]
PICTURE_TRIALS = [*QUICK, "epochs=1"]
PICTURE_SWEEP_TRIALS = 4
SEARCH_RECIPE = ROOT / "sweeps" / "sweep" / "dmg_search.yaml"


@pytest.fixture(scope="module")
def pictures_store(tmp_path_factory) -> Path:
    """Two single runs (DMG and aggregate training) and a ``dmg_search`` sweep, all by ``launch.py``."""
    store = tmp_path_factory.mktemp("pictures")
    launch(store, *PICTURE_RUNS, "method=aggregate")
    launch(store, *PICTURE_RUNS, "method=dmg")
    launch(store, "-m", "+sweep=dmg_search", f"hydra.sweeper.n_trials={PICTURE_SWEEP_TRIALS}", *PICTURE_TRIALS)
    return store


def close_assistant(page) -> None:
    """Close MLflow's assistant side panel (it covers a third of the page; closed, it stays closed in the context)."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def picture(page, path: Path, **options) -> Path:
    page.wait_for_timeout(1500)  # let charts finish their entry animation; the content was awaited before
    page.screenshot(path=str(path), **options)
    return path


def runs_table_picture(page, base_url: str, experiment_id: str, folder: Path) -> Path:
    page.goto(f"{base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    page.get_by_text("sweep-", exact=False).first.wait_for(state="visible")
    close_assistant(page)
    page.get_by_role("gridcell").filter(has_text="sweep-").locator("button").first.click()  # expand: its trials
    page.get_by_text("-trial", exact=False).first.wait_for(state="visible")
    return picture(page, folder / "runs-table.png")


def run_charts_picture(page, base_url: str, experiment_id: str, run_name: str, folder: Path) -> Path:
    """A run's Model metrics tab, filtered to the per-epoch loss and mean accuracies."""
    page.goto(f"{base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    page.get_by_text(run_name, exact=True).first.click()
    close_assistant(page)
    page.get_by_text("Model metrics", exact=True).click()
    page.get_by_placeholder("Search metric charts").fill("^(train/loss|val/acc_mean|test/acc_mean)$")
    page.get_by_text("acc_mean", exact=True).first.wait_for(state="visible")
    page.locator(".js-plotly-plot").first.get_by_text("Step").wait_for(state="visible")  # drawn, not loading
    return picture(page, folder / "run-charts.png")


def searched_param_keys(trials: list) -> list[str]:
    """The MLflow params carrying the values the ``dmg_search`` recipe samples: for each searched name, the shortest
    param key of every trial that ends with it (``method.overlap_lambda``; ``mask`` is kept under a longer key)."""
    searched = yaml.safe_load(SEARCH_RECIPE.read_text())["hydra"]["sweeper"]["params"]
    common = set.intersection(*(set(trial.data.params) for trial in trials))
    keys = []
    for name in searched:
        carriers = sorted((k for k in common if k == name or re.search(rf"[./]{re.escape(name)}$", k)), key=len)
        assert carriers, f"no param of the trials holds the searched value {name!r}"
        keys.append(carriers[0])
    return keys


def choose(page, box: int, names: list[str]) -> None:
    """Pick ``names`` in the compare page's ``box``-th multi-select (0: parameters, 1: metrics)."""
    select = page.locator("input[role=combobox]").nth(box)
    for name in names:
        select.click()
        select.fill(name)
        page.locator(f"[class*=select-item-option][title='{name}']").click()
    page.keyboard.press("Escape")


def parallel_coordinates_picture(page, base_url: str, client: MlflowClient, experiment_id: str, folder: Path):
    """The compare page of a study's trials, its parallel-coordinates plot set to the searched params against the
    study's objective (docs/sweeps.md, section 3)."""
    (parent,) = client.search_runs([experiment_id], "tags.sweep = 'optuna'")
    trials = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == PICTURE_SWEEP_TRIALS
    params = searched_param_keys(trials)
    ids = urllib.parse.quote(json.dumps([t.info.run_id for t in trials]))
    page.goto(f"{base_url}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([experiment_id]))}")
    page.get_by_text("Clear All").click()
    close_assistant(page)
    choose(page, 0, params)
    choose(page, 1, [parent.data.tags["objective"]])
    plot = page.locator(".js-plotly-plot").first
    for axis in [*params, parent.data.tags["objective"]]:
        plot.get_by_text(axis, exact=True).first.wait_for(state="visible")
    tab, bottom = page.get_by_text("Parallel Coordinates Plot").first.bounding_box(), plot.bounding_box()
    left, top = tab["x"] - 16, tab["y"] - 16
    clip = {"x": left, "y": top, "width": 1280 - left, "height": bottom["y"] + bottom["height"] + 16 - top}
    return picture(page, folder / "sweep-parallel-coordinates.png", clip=clip)


@pytest.mark.slow
def test_screenshots_of_the_runs_table_a_runs_charts_and_a_sweeps_parallel_coordinates(
    pictures_store, fresh_page, tmp_path, request
):
    folder = Path(request.config.getoption("--screenshots") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(f"sqlite:///{pictures_store}/mlflow.db")
    experiment_id = client.get_experiment_by_name("rotated_mnist").experiment_id
    runs = client.search_runs([experiment_id], "tags.method = 'dmg'")
    (dmg_run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    with mlflow_ui(pictures_store) as base_url:
        table = runs_table_picture(fresh_page, base_url, experiment_id, folder)
        charts = run_charts_picture(fresh_page, base_url, experiment_id, dmg_run.info.run_name, folder)
        plot = parallel_coordinates_picture(fresh_page, base_url, client, experiment_id, folder)
    for path in (table, charts, plot):
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and 10_000 < len(data) < MAX_PICTURE_BYTES, (path, len(data))
    for page in (ROOT / "README.md", ROOT / "docs" / "sweeps.md"):
        shown = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", page.read_text())
        assert shown and all((page.parent / name).is_file() for name in shown), (page, shown)
