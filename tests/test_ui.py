"""The MLflow UI as users see it: a real `mlflow server` over a store filled by a tiny cycle,
opened in headless Chromium (Debian `chromium` and `chromium-driver`, installed by `.ci/run`).
Screenshots are kept under the test's tmp_path (`ui/*.png`; pytest keeps the last three runs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import ROOT, free_port, wait_for_mlflow_server
from mlproject.config import load_config

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")



@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and DRIVER):
        pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them where apt-get is allowed)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


@pytest.fixture
def served_cycle(tmp_path, mlflow_store, monkeypatch, ray_session):
    """A tiny cycle (first model, paper trading, retrain) in a sqlite store, served by `mlflow server`."""
    from pipelines import orchestrate

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "conf" / "smoke.yaml", [
        "train.iterations=2", "data.synthetic.n_bars=1500", "continuous_learning.paper_bars=60",
        "continuous_learning.min_annotated_for_finetune=100000"])
    result = orchestrate.main(cfg, "all")
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", mlflow_store,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_mlflow_server(base, server)
        yield base, result
    finally:
        server.terminate()
        server.wait(timeout=60)


def _wait_for(driver, predicate, what: str, timeout: float = 90.0):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: predicate(d))
    except Exception as exc:  # noqa: BLE001 - a timeout says what did not appear
        raise AssertionError(f"the UI did not show {what} within {timeout:.0f} s") from exc


def test_the_ui_shows_the_cycle_runs_charts_equity_plot_and_production(browser, served_cycle, tmp_path):
    from selenium.webdriver.common.by import By

    base, result = served_cycle
    shots = tmp_path / "ui"
    shots.mkdir()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    experiment = mlflow.get_run(result.run_id).info.experiment_id
    by_name = {r.info.run_name: r for r in runs}
    text = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731

    # The runs list, in the model-training view the summary's link selects; the cycle's children
    # appear under it when expanded.
    browser.get(f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning")
    cell = _wait_for(browser, lambda d: d.find_elements(By.XPATH, "//*[text()='cycle-all']"), "the cycle-all run")[0]
    cell.find_element(By.XPATH, "ancestor::span[contains(@class, 'ag-cell-value')]").find_element(
        By.TAG_NAME, "button").click()
    _wait_for(browser, lambda d: {"ingest", "train", "evaluate", "promote", "collect"} <= set(text(d).split("\n")),
              "the cycle's child runs")
    browser.save_screenshot(str(shots / "runs.png"))

    # A train run's first section of charts is its learning curves, drawn.
    train = by_name["train"].info.run_id
    browser.get(f"{base}/#/experiments/{experiment}/runs/{train}/model-metrics?workflowType=machine_learning")
    _wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 4,
              "the train run's charts")
    lines = text(browser).split("\n")  # a section header is its name, then "(<charts>)" on its own line
    sections = [lines[i - 1] for i in range(1, len(lines)) if re.fullmatch(r"\(\d+\)", lines[i])]
    assert sections and sections[0] == "train", sections
    browser.save_screenshot(str(shots / "train_charts.png"))

    # The evaluate run's charts start with its equity and drawdown curves, not one-value bars.
    evaluate = by_name["evaluate"].info.run_id
    browser.get(f"{base}/#/experiments/{experiment}/runs/{evaluate}/model-metrics?workflowType=machine_learning")
    _wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 2,
              "the evaluate run's charts")
    lines = text(browser).split("\n")
    sections = [lines[i - 1] for i in range(1, len(lines)) if re.fullmatch(r"\(\d+\)", lines[i])]
    assert sections and sections[0] == "backtest", sections
    browser.save_screenshot(str(shots / "evaluate_charts.png"))

    # The evaluate run's equity plot renders (the image loads from the server).
    browser.get(f"{base}/#/experiments/{experiment}/runs/{evaluate}/artifacts/eval/equity_drawdown.png"
                "?workflowType=machine_learning")
    # The artifact viewer shows the PNG from a blob the server's artifact download filled.
    _wait_for(browser, lambda d: any(img.get_attribute("naturalWidth") not in (None, "0")
                                     for img in d.find_elements(By.TAG_NAME, "img")
                                     if (img.get_attribute("src") or "").startswith("blob:")),
              "the equity/drawdown plot")
    browser.save_screenshot(str(shots / "equity.png"))

    # "Compare" on the train, evaluate and promote runs lines up the quantities they share by name.
    ids = [by_name[n].info.run_id for n in ("train", "evaluate", "promote")]
    browser.get(f"{base}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([experiment])}"
                "&workflowType=machine_learning")
    sharpes = [by_name[n].data.metrics["sharpe"] for n in ("train", "evaluate", "promote")]
    # The parallel-coordinates plot opens on the metric the three runs share; its axis is labelled
    # with the runs' extreme values (5 decimals, a Unicode minus).
    ends = [f"{v:.5f}" for v in (min(sharpes), max(sharpes))]
    _wait_for(browser, lambda d: "sharpe" in text(d).split("\n") and all(
        e in text(d).replace("\u2212", "-") for e in ends), f"the three runs' sharpe ({ends}) compared")
    browser.save_screenshot(str(shots / "compare.png"))

    # The registered model page: the Production version and its alias.
    browser.get(f"{base}/#/models/nt8-agent?workflowType=machine_learning")
    _wait_for(browser, lambda d: "@ production" in text(d) and "Production" in text(d), "Production and its alias")
    # Its tags are two compact lines; the event history lives in the history run.
    _wait_for(browser, lambda d: "production_latest" in text(d), "the production_latest tag")
    assert "production_event" not in text(browser)
    browser.save_screenshot(str(shots / "model.png"))
    print(f"screenshots: {shots}")
