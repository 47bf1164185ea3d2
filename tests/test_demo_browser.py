"""The demo in a real browser: headless Chromium (through Selenium and chromedriver) opens `python -m adaface.demo
--tiny` served on 127.0.0.1, uploads a real photo from insightface's package, generates, and sees the image.

Skipped with the reason when Chromium, chromedriver, Selenium or Gradio is missing (`.ci/install_browser.sh`
installs the browser). Every wait has a timeout, so a hung page fails the test instead of blocking the run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
START_TIMEOUT_S = 150  # building and loading the tiny models, importing gradio
PAGE_TIMEOUT_S = 30
GENERATE_TIMEOUT_S = 60


@pytest.fixture
def browser() -> tuple[str, str]:
    """(browser, chromedriver) paths, or a skip saying what is missing."""
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no headless browser: needs chromium and chromedriver on PATH (.ci/install_browser.sh)")
    for module in ("selenium", "gradio"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[test]')")
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photo() -> str:
    import insightface

    photo = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    assert photo.is_file(), photo
    return str(photo)


@pytest.fixture
def server(tmp_path):
    """The tiny demo on a free port; yields (url, output folder); stopped (and its log shown on failure) after."""
    port = _free_port()
    out = tmp_path / "outputs"
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "adaface.demo", "--tiny", "--tiny-dir", str(tmp_path / "tiny"), "--host",
         "127.0.0.1", "--port", str(port), "--out", str(out)],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo exited with {proc.returncode}:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not answer in {START_TIMEOUT_S}s:\n"
                            f"{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url, out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()


def test_upload_generate_and_see_the_image(browser, server, tmp_path):
    browser, driver_path = browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    url, out = server
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    screenshot = tmp_path / "demo.png"
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT_S)
        driver.get(url)
        wait = WebDriverWait(driver, PAGE_TIMEOUT_S)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#photos input[type=file]"))
        upload.send_keys(_photo())
        wait.until(lambda d: "t1.jpg" in d.find_element(By.ID, "photos").text.replace("\n", ""))  # uploaded
        # the page re-renders around the upload (the detected faces appear): wait for the button it leaves
        wait.until(expected_conditions.element_to_be_clickable((By.ID, "generate"))).click()

        def done(d):
            images = [i for i in d.find_elements(By.CSS_SELECTOR, "#gallery img")
                      if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)]
            return images or "Error" in d.find_element(By.ID, "status").text

        WebDriverWait(driver, GENERATE_TIMEOUT_S).until(done)
        status = driver.find_element(By.ID, "status").text
        assert "Error" not in status, status
        (image,) = [i for i in driver.find_elements(By.CSS_SELECTOR, "#gallery img") if i.get_attribute("src")]
        src = image.get_attribute("src")
        with urllib.request.urlopen(src, timeout=10) as r:
            shown = r.read()
    finally:
        driver.save_screenshot(str(screenshot))  # on a failure too: it shows where the page stood
        (tmp_path / "page.txt").write_text(driver.find_element(By.TAG_NAME, "body").text)
        driver.quit()
    print(f"screenshot: {screenshot}")

    # what the page shows is the generated file, scored against the uploaded photo
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert shown == (folder / "p00_000.png").read_bytes()
    assert "p00_000.png: a photo of z · seed 0 · " in status
    assert "ArcFace" in status or "no face detected" in status
    assert (folder / "subject.safetensors").is_file() and (folder / "settings.json").is_file()
    assert screenshot.stat().st_size > 10_000
