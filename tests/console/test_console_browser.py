"""The console in a real browser: Debian's headless Chromium (driven through its chromedriver)
against a running ``airflow api-server``: log in through Airflow's login page, open the
Conversions page, check the delivered partition's count and the failed partition's rerun, open
the run tab and the envelope health page. Screenshots are kept as test artefacts in
``$CAPI_TEST_ARTIFACTS`` (default ``.artifacts/console/``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from capi_devtools import REPO
from tests.support.distributed import Component, free_port, wait_for

pytestmark = pytest.mark.airflow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("CAPI_TEST_ARTIFACTS", REPO / ".artifacts" / "console"))
PASSWORD = "console-test-pw"  # a throwaway user of a throwaway api-server

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    if os.environ.get("CAPI_REQUIRE_BROWSER"):
        raise RuntimeError("CAPI_REQUIRE_BROWSER is set but chromium / chromedriver are missing: run `make browser`")
    pytest.skip("Debian's chromium and chromium-driver are not installed (make browser)", allow_module_level=True)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def api_server(console_world, tmp_path_factory) -> Iterator[str]:
    home = Path(os.environ["AIRFLOW_HOME"])
    passwords = tmp_path_factory.mktemp("auth") / "passwords.json"
    passwords.write_text(json.dumps({"admin": PASSWORD}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **console_world.env,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API__BASE_URL": url,
    }
    log_path = home / "api-server-console.log"
    with log_path.open("wb") as log:
        server = Component(
            "api-server",
            subprocess.Popen(
                [str(Path(sys.executable).parent / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            ),
            log_path,
        )
    try:
        wait_for("the api-server", lambda: _healthy(url), timeout=120, interval=0.5, diagnose=server.log_tail,
                 abort=lambda: None if server.alive() else "it exited")
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1500,1100", "--force-color-profile=srgb"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _login(driver, url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/auth/login")
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "input[name=username]"))
    driver.find_element(By.CSS_SELECTOR, "input[name=username]").send_keys("admin")
    driver.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(driver, lambda d: "/auth/login" not in d.current_url and d.get_cookie("_token"))


def _into_console_frame(driver) -> None:
    from selenium.webdriver.common.by import By

    frame = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "iframe[src*='capi-console']"))[0]
    driver.switch_to.frame(frame)


def _click_tab(label: str, frame: str = "capi-console/run"):
    """A wait condition that clicks the run page's tab named ``label`` (the UI re-renders while loading)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def click(driver) -> bool:
        try:
            tabs = [e for e in driver.find_elements(By.CSS_SELECTOR, "a, button") if e.text.strip() == label]
            if not tabs:
                return False
            tabs[-1].click()
            return bool(driver.find_elements(By.CSS_SELECTOR, f"iframe[src*='{frame}']"))
        except StaleElementReferenceException:
            return False

    return click


def _shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.switch_to.default_content()
    driver.save_screenshot(str(path))
    return path


def test_console_pages_in_chromium(api_server, browser, console_world):
    from selenium.webdriver.common.by import By

    driver = browser
    # Without a login the console's own page answers 401, like its API.
    driver.get(f"{api_server}/capi-console/api/partitions")
    assert "Not authenticated" in driver.page_source

    _login(driver, api_server)
    driver.get(f"{api_server}/plugin/conversions")
    _into_console_frame(driver)
    delivered = console_world.summary(console_world.delivered)["delivered_events"]
    row = f"tr[data-partition='{console_world.delivered}']"
    cell = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"{row} td.delivered"))[0]
    assert cell.text == str(delivered)
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar"))
    assert _shot(driver, "conversions").stat().st_size > 10_000

    # The failed partition: what failed and the exact rerun.
    _into_console_frame(driver)
    failed_row = f"tr[data-partition='{console_world.refused}']"
    driver.find_element(By.CSS_SELECTOR, f"{failed_row} button.rerun-button").click()
    rerun = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid=rerun] pre.cli"))[0]
    assert rerun.text == (
        f"airflow dags trigger tiktok_conversions --conf '{json.dumps({'partition': console_world.refused})}'"
    )
    assert driver.find_elements(By.CSS_SELECTOR, "[data-testid=rerun] a[href*='/tasks/send/mapped/']")
    driver.execute_script("document.querySelector('[data-testid=rerun]').scrollIntoView()")
    _shot(driver, "conversions-failed-partition")

    # The tab on the run page.
    run_id = console_world.summary(console_world.delivered)["run_id"]
    driver.get(f"{api_server}/dags/tiktok_conversions/runs/{run_id}")
    _wait(driver, _click_tab("Conversions"))
    _into_console_frame(driver)
    card = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-metric=delivered] .value"))[0]
    assert card.text == str(delivered)
    _shot(driver, "run-tab")

    # The tab on the failed send task's page: its shard and its failed batch.
    failed_run = console_world.summary(console_world.refused)["run_id"]
    driver.get(f"{api_server}/dags/tiktok_conversions/runs/{failed_run}/tasks/send/mapped/0")
    _wait(driver, _click_tab("Conversions", "capi-console/task"))
    _into_console_frame(driver)
    shard = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid=shard] [data-metric='failed events'] .value"))[0]
    assert shard.text == "1"
    _shot(driver, "task-tab")

    driver.get(f"{api_server}/plugin/conversions-envelopes")
    _into_console_frame(driver)
    stored = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-metric='envelopes stored'] .value"))[0]
    assert int(stored.text.replace(",", "")) > 0
    _shot(driver, "envelope-health")
