"""Both UIs in a real browser: headless Debian chromium driven by Playwright, against a stack of our own.

``forgeline up`` -> ``deploy`` -> two ``run --deployed`` (version 1 with the smoke config's 40 steps,
then a 20-step run, so there are two pipeline runs to compare). Then, like a user would:

- MLflow: the runs table lists the ``pipeline`` runs and, expanded, the nested runs; the ``train`` run's
  page draws its loss chart (and shows the ``loss_curve.png`` artifact); two runs are selected and compared;
- Prefect: the deployments page lists every deployment (pipeline, train, tune, retrain among them); the
  ``pipeline`` deployment's custom run form shows the config as fields; a pipeline flow run page lists its
  ``train`` subflow and its artifacts.

Every page is saved as a PNG under ``$FORGELINE_SCREENSHOT_DIR`` (default
``.forgeline/test-output/screenshots``, git-ignored), in the folder ``test_browser/``; a failing test also
saves the page it failed on. The browser is what ``which chromium`` finds (never ``playwright install``).
About 3 minutes on 2 cores, most of it the stack and the two pipeline runs.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ROOT, Project, prefect_client

pytestmark = pytest.mark.e2e

# Flags from STACK-NOTES "Browser": headless as root, and nothing that phones home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 60_000  # generous: both UIs are single-page apps fetching from servers on 2 busy cores
EXPERIMENT = "forgeline-smoke"
MODEL = "forgeline-smoke-lm"
NESTED = ("clean", "train", "evaluate", "register")  # smoke.yaml has tune.n_trials: 0, so no tune run
DEPLOYMENTS = ("pipeline", "retrain", "train", "tune")  # at least these; the page must list all there are
FLOW_RUN_URL = re.compile(r"/runs/flow-run/([0-9a-f-]{36})")
MLFLOW_RUN_URL = re.compile(r"#/experiments/\d+/runs/([0-9a-f]{32})")


@dataclass(frozen=True)
class Stack:
    """What the browser checks compare against, read through the clients, not the UIs."""

    mlflow: str
    prefect: str
    experiment_id: str
    pipeline_run_id: str  # MLflow run of version 1's pipeline
    other_pipeline_run_id: str  # the 20-step run
    nested: dict[str, str]  # run name -> run id, version 1's children
    train_steps: int  # train/loss values logged by version 1's train run
    pipeline_flow_run_id: str  # Prefect flow run of version 1's pipeline
    train_flow_run_id: str  # its train subflow on the gpu pool
    pipeline_deployment_id: str
    deployments: tuple[str, ...]  # every deployment the Prefect API has


def screenshot_dir() -> Path:
    """Where screenshots land: ``$FORGELINE_SCREENSHOT_DIR/test_browser`` (default under ``.forgeline/``)."""
    base = os.environ.get("FORGELINE_SCREENSHOT_DIR") or ROOT / ".forgeline" / "test-output" / "screenshots"
    return Path(base) / "test_browser"


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    """Screenshot folders: pytest's tmp path and the kept copy (emptied first, so no stale PNG misleads)."""
    kept = screenshot_dir()
    if kept.exists():
        for old in kept.glob("*.png"):
            old.unlink()
    kept.mkdir(parents=True, exist_ok=True)
    yield [tmp_path_factory.mktemp("screenshots"), kept]


def _run_deployed(project: Project, *extra: str) -> tuple[str, str, str]:
    """``forgeline run --deployed``; returns (pipeline flow run id, MLflow pipeline run id, stdout)."""
    ran = project.forgeline(
        "run", "--config", "configs/smoke.yaml", "--deployed", "--set", "deploy.allow_cpu_fallback=true", *extra
    )
    flow_run = FLOW_RUN_URL.search(ran.stdout)
    mlflow_run = MLFLOW_RUN_URL.search(ran.stdout)
    assert flow_run and mlflow_run, ran.stdout
    return flow_run.group(1), mlflow_run.group(1), ran.stdout


@pytest.fixture(scope="module")
def stack(project: Project) -> Stack:
    project.forgeline("up", "--prefect-port", str(project.prefect_port), "--mlflow-port", str(project.mlflow_port))
    project.forgeline("deploy", "--config", "configs/smoke.yaml", "--set", "deploy.allow_cpu_fallback=true")
    flow_run_id, pipeline_run_id, out = _run_deployed(project)
    assert f"completed: {MODEL} version 1" in out, out
    _, other_run_id, out = _run_deployed(project, "--set", "train.max_steps=20")
    assert f"completed: {MODEL} version 2" in out, out

    from mlflow import MlflowClient

    mlflow_url = f"http://127.0.0.1:{project.mlflow_port}"
    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{pipeline_run_id}'"
    )
    nested = {run.info.run_name: run.info.run_id for run in children}
    assert sorted(nested) == sorted(NESTED), nested
    train_steps = len(client.get_metric_history(nested["train"], "train/loss"))
    assert train_steps > 10

    prefect_url = f"http://127.0.0.1:{project.prefect_port}"
    with prefect_client(prefect_url + "/api") as pc:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        subflows = pc.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        assert len(subflows) == 1, subflows
        deployment = pc.read_deployment_by_name("pipeline/pipeline")
        deployments = tuple(sorted(d.name for d in pc.read_deployments()))
    assert set(DEPLOYMENTS) <= set(deployments), deployments
    return Stack(
        mlflow=mlflow_url,
        prefect=prefect_url,
        experiment_id=experiment.experiment_id,
        pipeline_run_id=pipeline_run_id,
        other_pipeline_run_id=other_run_id,
        nested=nested,
        train_steps=train_steps,
        pipeline_flow_run_id=flow_run_id,
        train_flow_run_id=str(subflows[0].id),
        pipeline_deployment_id=str(deployment.id),
        deployments=deployments,
    )


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Any]:
    """One chromium for the module (Playwright gives it a fresh temporary profile)."""
    from playwright.sync_api import expect, sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is not installed (apt-get install chromium; .ci/run does it)"
    expect.set_options(timeout=UI_TIMEOUT_MS)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


class Shooter:
    """Saves numbered screenshots of one test's page into every screenshot folder."""

    def __init__(self, page: Any, folders: list[Path], prefix: str) -> None:
        self.page = page
        self.folders = folders
        self.prefix = prefix

    def __call__(self, name: str, *, full_page: bool = False) -> None:
        png = self.page.screenshot(full_page=full_page)
        for folder in self.folders:
            (folder / f"{self.prefix}-{name}.png").write_bytes(png)


@pytest.fixture
def page(browser: Any, shots: list[Path], request: pytest.FixtureRequest) -> Iterator[tuple[Any, Shooter]]:
    """A tab in a context of its own and its screenshot helper; the tab is photographed if the test fails.

    A context per test: the MLflow UI keeps UI state (expanded rows) in local storage, and a row expanded by
    one test would change what another test's clicks select.
    """
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    tab = context.new_page()
    prefix = request.node.name.removeprefix("test_")
    shoot = Shooter(tab, shots, prefix)
    failed_before = request.session.testsfailed
    try:
        yield tab, shoot
    finally:
        # The call phase's report is counted before function fixtures tear down.
        if request.session.testsfailed > failed_before:
            shoot("FAILED", full_page=True)
        context.close()


# ----------------------------------------------------------------------------------------------- MLflow
def _runs_table(tab: Any, stack: Stack) -> None:
    from playwright.sync_api import expect

    tab.goto(f"{stack.mlflow}/#/experiments/{stack.experiment_id}/runs")
    expect(tab.get_by_role("link", name="pipeline", exact=True)).to_have_count(2)


def _run_row(tab: Any, run_id: str) -> Any:
    return tab.get_by_role("row").filter(has=tab.locator(f"a[href$='/runs/{run_id}']"))


def test_mlflow_lists_the_pipeline_run_with_its_nested_runs(page: tuple[Any, Shooter], stack: Stack) -> None:
    from playwright.sync_api import expect

    tab, shoot = page
    _runs_table(tab, stack)
    names = tab.locator("[col-id='attributes.`Run Name`'] a")
    # Nested runs sit under their parent: collapsed, the table shows only the two pipeline runs.
    expect(names).to_have_text(["pipeline", "pipeline"])
    shoot("1-runs-collapsed")

    row = _run_row(tab, stack.pipeline_run_id)
    row.locator("[col-id='attributes.`Run Name`'] button").click()  # the expand (+) button
    for name, run_id in stack.nested.items():
        link = tab.get_by_role("link", name=name, exact=True)
        expect(link).to_be_visible()
        expect(link).to_have_attribute("href", f"#/experiments/{stack.experiment_id}/runs/{run_id}")
    expect(names).to_have_count(2 + len(stack.nested))
    shoot("2-runs-expanded")


def test_mlflow_train_run_page_shows_the_loss_chart(page: tuple[Any, Shooter], stack: Stack) -> None:
    from playwright.sync_api import expect

    tab, shoot = page
    train = stack.nested["train"]
    tab.goto(f"{stack.mlflow}/#/experiments/{stack.experiment_id}/runs/{train}")
    expect(tab.get_by_role("heading", name="train", exact=True)).to_be_visible()
    tab.get_by_role("tab", name="Model metrics").click()
    card = tab.get_by_test_id("experiment-view-compare-runs-card").filter(has_text="train (train/loss)")
    expect(card).to_have_count(1)
    # One plotted point per logged train/loss value: the chart is drawn from this run's data.
    expect(card.locator(".js-plotly-plot g.points path.point")).to_have_count(stack.train_steps)
    expect(card.locator(".js-plotly-plot path.js-line")).not_to_have_count(0)
    shoot("1-model-metrics")

    tab.get_by_role("tab", name="Artifacts").click()
    tab.get_by_text("loss_curve.png", exact=True).click()
    image = tab.locator("img[src^='blob:']").first
    expect(image).to_be_visible()
    assert image.evaluate("img => img.complete && img.naturalWidth") > 500  # loss vs step and vs wall time
    shoot("2-loss-curve-artifact")


def test_mlflow_compares_two_runs(page: tuple[Any, Shooter], stack: Stack) -> None:
    from playwright.sync_api import expect

    tab, shoot = page
    _runs_table(tab, stack)
    for run_id in (stack.pipeline_run_id, stack.other_pipeline_run_id):
        _run_row(tab, run_id).locator("input.ag-checkbox-input").check()
    shoot("1-two-selected")
    tab.get_by_role("button", name="Compare", exact=True).click()

    expect(tab).to_have_url(re.compile(r"#/compare-runs\?runs="))
    expect(tab.get_by_text("Comparing 2 Runs from 1 Experiment")).to_be_visible()
    for run_id in (stack.pipeline_run_id, stack.other_pipeline_run_id):
        expect(tab.get_by_role("link", name=run_id, exact=True)).to_be_visible()
    # The parameter the two runs differ in, with each run's value.
    max_steps = tab.get_by_role("row").filter(has=tab.get_by_text("train.max_steps", exact=True)).last
    expect(max_steps).to_contain_text("40")
    expect(max_steps).to_contain_text("20")
    shoot("2-compare")


# ---------------------------------------------------------------------------------------------- Prefect
def _deployment_link(tab: Any, name: str) -> Any:
    # Each row also links its flow under the same name, rendered a moment later: pick the deployment's own link.
    return tab.locator(f"a.deployment-list__name[title='{name}']")


def test_prefect_lists_the_deployments(page: tuple[Any, Shooter], stack: Stack) -> None:
    from playwright.sync_api import expect

    tab, shoot = page
    tab.goto(f"{stack.prefect}/deployments")
    expect(tab.get_by_text(f"{len(stack.deployments)} Deployments", exact=True)).to_be_visible()
    for name in stack.deployments:
        link = _deployment_link(tab, name)
        expect(link).to_have_text(name)
        expect(link).to_have_attribute("href", re.compile(r"^/deployments/deployment/[0-9a-f-]{36}$"))
    shoot("1-deployments")


def _form_field(tab: Any, label: str) -> Any:
    """The first input of the schema-form property labelled ``label`` (Prefect renders labels as spans)."""
    return tab.locator(
        f"xpath=//span[contains(@class, 'schema-form-property__label') and normalize-space()='{label}']"
        "/ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]"
        "//*[self::input or self::textarea]"
    ).first


def test_prefect_pipeline_custom_run_form_shows_the_config(page: tuple[Any, Shooter], stack: Stack) -> None:
    from playwright.sync_api import expect

    tab, shoot = page
    tab.goto(f"{stack.prefect}/deployments")
    _deployment_link(tab, "pipeline").click()
    expect(tab).to_have_url(re.compile(f"/deployments/deployment/{stack.pipeline_deployment_id}"))
    tab.get_by_role("button", name="Run", exact=True).click()
    tab.get_by_text("Custom run", exact=True).click()

    expect(tab).to_have_url(re.compile(f"/deployments/deployment/{stack.pipeline_deployment_id}/run"))
    expect(tab.get_by_text("The whole pipeline config (the Prefect UI renders it as a form).")).to_be_visible()
    # Fields filled with the deployed config's values (configs/smoke.yaml); the first "Max Steps" is train's.
    expect(_form_field(tab, "Name (Optional)")).to_have_value(EXPERIMENT)
    expect(_form_field(tab, "Seed (Optional)")).to_have_value("7")
    expect(_form_field(tab, "Max Steps (Optional)")).to_have_value("40")
    expect(_form_field(tab, "Learning Rate (Optional)")).to_have_value("0.003")
    shoot("1-custom-run-form")
    _form_field(tab, "Max Steps (Optional)").scroll_into_view_if_needed()
    shoot("2-custom-run-form-train")


def test_prefect_flow_run_page_shows_subflow_and_artifacts(page: tuple[Any, Shooter], stack: Stack) -> None:
    from playwright.sync_api import expect

    tab, shoot = page
    tab.goto(f"{stack.prefect}/runs/flow-run/{stack.pipeline_flow_run_id}")
    expect(tab.get_by_text(f"pipeline {EXPERIMENT}", exact=True).first).to_be_visible()

    # The tab shows on click only (a ?tab= URL is not honoured on first load).
    tab.locator("li.p-tab", has_text="Subflow Runs").click()
    expect(tab.get_by_text("1 Flow run", exact=True)).to_be_visible()
    subflow = tab.locator(f"a[href='/runs/flow-run/{stack.train_flow_run_id}']")
    expect(subflow).to_have_text(f"train {EXPERIMENT}")
    shoot("1-subflow-runs")

    tab.locator("li.p-tab", has_text="Artifacts").click()
    for key in ("pipeline-summary", "headline-metrics", "mlflow-run", "cleaning-report"):
        expect(tab.get_by_text(key, exact=True)).to_be_visible()
    shoot("2-artifacts")

    tab.get_by_text("pipeline-summary", exact=True).click()
    expect(tab).to_have_url(re.compile(r"/artifacts/artifact/[0-9a-f-]{36}"))
    expect(tab.get_by_role("heading", name=f"Pipeline run: {EXPERIMENT}")).to_be_visible()
    expect(tab.get_by_text(f"{MODEL}", exact=True)).to_be_visible()
    expect(tab.get_by_text("promoted to champion: first version")).to_be_visible()
    expect(tab.get_by_role("link", name=stack.pipeline_run_id, exact=True)).to_be_visible()
    shoot("3-pipeline-summary")
