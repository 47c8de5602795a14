"""The explorer in a real browser: `headscope explore` on a free port, Debian's headless Chromium
driven by Selenium through Debian's chromedriver; click a head on the map, open its attention
pattern, save a screenshot to test-artifacts/explorer.png.

Chromium comes from tests/browser_setup.sh (run by `make test` as root); without it this skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from headscope.apps.explore import free_port

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Without the background-networking flags Chromium keeps opening connections this machine refuses.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1300")

pytestmark = [
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="Debian chromium/chromium-driver not installed: run tests/browser_setup.sh as root "
                              "(make test does) or apt-get install -y chromium chromium-driver"),
    pytest.mark.timeout(300),
]


def explore_command(port: int) -> list[str]:
    """`headscope explore` from the venv's console script, or the module when it is not installed."""
    exe = Path(sys.executable).with_name("headscope")
    if exe.exists():
        return [str(exe), "explore", "--port", str(port)]
    return [sys.executable, "-m", "headscope.apps.explore", "--port", str(port)]


@pytest.fixture()
def server():
    port = free_port()
    proc = subprocess.Popen(explore_command(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    first = proc.stdout.readline()
    assert f"http://127.0.0.1:{port}" in first, first  # the address is printed
    deadline = time.time() + 60
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, "streamlit did not start"
        time.sleep(0.5)
    yield f"http://127.0.0.1:{port}"
    os.killpg(proc.pid, 15)
    proc.wait(timeout=20)


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="headscope-chromium-")
    for flag in FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_click_a_head_and_see_its_pattern(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 180)
    browser.get(server)
    # The head map: one square marker per head (30 x 9 for the embedded model) plus the selection box.
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "g.trace.scatter path.point")) >= 270)

    def sidebar_value(label):
        return browser.find_element(By.CSS_SELECTOR, f'input[aria-label="{label}"]').get_attribute("value")

    assert (sidebar_value("layer"), sidebar_value("head")) == ("0", "0")
    layer, head = 5, 3
    point = browser.find_elements(By.CSS_SELECTOR, "g.trace.scatter path.point")[layer * 9 + head]
    ActionChains(browser).move_to_element(point).click().perform()
    wait.until(lambda d: (sidebar_value("layer"), sidebar_value("head")) == (str(layer), str(head)))

    browser.find_element(By.XPATH, "//label[.//p[text()='Attention pattern']]").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "g.heatmaplayer image, g.heatmaplayer"))
    wait.until(lambda d: any(f"layer {layer} head {head}" in t.text
                             for t in d.find_elements(By.CSS_SELECTOR, "text.gtitle")))
    # streamlit may re-render the chart while we read it: retry reads that hit a replaced element
    from selenium.common.exceptions import StaleElementReferenceException

    ticks = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: [t.text for t in d.find_elements(By.CSS_SELECTOR, "g.xtick text")] or False)
    assert ticks and ticks[0].startswith("0:")  # token labels on the key axis
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"], [data-testid="stAlertContentError"]')
    time.sleep(1.0)  # let plotly finish its transition before the screenshot
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "explorer.png"))
    assert (ARTIFACTS / "explorer.png").stat().st_size > 20_000
