"""`evomerge ui` in a real headless Chromium: the MLflow UI serves a tracked run, the experiment page lists
the candidate runs, and the parent run's pareto.png renders (its screenshot is saved to docs/)."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import evomerge_command, free_ports, kill_group, spawn

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("EVOMERGE_REQUIRE_BROWSER"):
        raise RuntimeError("chromium and chromedriver are required (.ci/run installs them)")
    pytest.skip(
        "no chromium/chromedriver on this machine (apt install chromium chromium-driver)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def tracked_run(quick_zoo, local_ray, tmp_path_factory):
    """The demo search (configs/demo.yaml) on the quick_zoo, shortened: 16 candidates on a 40-prompt subsample."""
    import yaml

    from evomerge.config import parse_config
    from evomerge.runtime.run import create_run_dir, execute

    run_dir = tmp_path_factory.mktemp("ui") / "demo"
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    data["models"] = {
        "base": str(quick_zoo["base"]),
        "sources": [str(p) for n, p in quick_zoo.items() if n != "base"],
    }
    data["budget"] = {"candidates": 16}
    data["evaluator"]["subsample"] = 40
    data.pop("fidelity")  # every one of the 40 prompts (the demo's 50-item subset would not fit)
    data["output"] = str(run_dir)
    cfg = parse_config(data, "test")
    _state, summary = execute(create_run_dir(cfg, None, None), cfg)
    return run_dir, summary


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1600,1000"):  # fmt: skip
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _wait_text(driver, text, seconds=60):
    from selenium.webdriver.common.by import By

    deadline = time.time() + seconds
    while time.time() < deadline:
        if text in driver.find_element(By.TAG_NAME, "body").text:
            return True
        time.sleep(0.5)
    return False


def _wait_element(driver, xpath, seconds=60):
    from selenium.webdriver.common.by import By

    deadline = time.time() + seconds
    while time.time() < deadline:
        found = driver.find_elements(By.XPATH, xpath)
        if found:
            return found[0]
        time.sleep(0.5)
    return None


def test_ui_serves_the_run_lists_candidates_and_shows_the_front(tracked_run, tmp_path):
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By

    run_dir, summary = tracked_run
    [port] = free_ports()
    proc = spawn(evomerge_command("ui", run_dir, "--port", port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True)  # fmt: skip
    driver = None
    try:
        url = proc.stdout.readline().strip().removeprefix("MLflow UI: ")
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/"), url
        client = MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
        experiment_id = url.split("/experiments/")[1].split("/")[0]
        parent = client.search_runs([experiment_id], filter_string="tags.`evomerge.run_dir` != ''")[0]
        children = client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        assert len(children) == 16
        driver = _browser()
        driver.get(url)
        name = parent.info.run_name
        row = _wait_element(driver, f"//*[@role='row'][.//a[normalize-space(.)='{name}']]")
        assert row is not None, "the experiment page never listed the search run"
        row.find_elements(By.XPATH, ".//button")[0].click()  # expand the parent: its candidate runs
        names = [c.info.run_name for c in children]
        assert _wait_text(driver, names[0])
        body = driver.find_element(By.TAG_NAME, "body").text
        listed = [n for n in names if n in body]
        assert len(listed) >= 8, f"only {len(listed)} candidate runs listed"
        driver.get(
            f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{parent.info.run_id}/artifacts/pareto.png"
        )
        assert _wait_text(driver, "pareto.png")
        deadline = time.time() + 30
        while time.time() < deadline:
            images = [i for i in driver.find_elements(By.TAG_NAME, "img") if i.size["height"] > 200]
            if images:
                break
            time.sleep(0.5)
        assert images, "pareto.png did not render"
        shot = tmp_path / "ui_pareto.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("EVOMERGE_UI_SCREENSHOT"):  # tools/refresh_docs: the README's figure
            shutil.copy(shot, os.environ["EVOMERGE_UI_SCREENSHOT"])
    finally:
        if driver is not None:
            driver.quit()
        kill_group(proc, signal.SIGTERM, timeout=30)
