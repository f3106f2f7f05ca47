"""The chat page at `/` in a real headless Chromium (Selenium): type a message, watch the answer stream in, see
the stored memory item, delete it. Skips with the reason when no browser or driver is installed."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

pytest.importorskip("starlette", reason="the server extra is not installed (pip install -e .[serve])")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")

from chat.memory_db import MemoryDB
from chat.serve.app import ServerConfig, create_app
from infer.sampler import SamplingConfig
from tests.serve_fixtures import EchoLM, echo_tokenizer, make_engine, running_server

CHROMIUM = os.environ.get("OHLORA_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)),
                                reason=f"no headless browser: {CHROMIUM} or chromedriver missing "
                                       "(apt-get install chromium chromium-driver)")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ohlora-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_page_streams_an_answer_and_deletes_a_memory(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tok = echo_tokenizer(tmp_path / "tok")
    model = EchoLM(tok, delay=0.03)                                   # slow enough to see the answer grow
    engine = make_engine(model, tok)
    db = MemoryDB(tmp_path / "memory.sqlite")
    app = create_app(engine, db, ServerConfig(sampling=SamplingConfig(no_repeat_ngram_size=0, max_new_tokens=200)))
    try:
        with running_server(app) as url:
            browser.get(url + "/")
            assert browser.title == "오로라"
            user = browser.find_element(By.ID, "user").get_attribute("value")
            assert user.startswith("web-")
            wait = WebDriverWait(browser, 30, poll_frequency=0.02)
            box = browser.find_element(By.ID, "message")
            box.send_keys("[좋아하는 음식: 떡볶이] 나는 떡볶이를 정말 좋아해. 너는 무슨 음식 좋아해?")
            browser.find_element(By.ID, "send").click()

            def answer() -> str | None:                                 # the last answer's text as shown now
                return browser.execute_script(
                    "const a = document.querySelectorAll('#log li.bot .text'); "
                    "return a.length ? a[a.length - 1].textContent : null;")

            seen = set()
            wait.until(lambda d: seen.add(answer()) or answer() == "나는 떡볶이를 정말 좋아해. 너는 무슨 음식 좋아해?")
            partial = {t for t in seen if t and t != "나는 떡볶이를 정말 좋아해. 너는 무슨 음식 좋아해?"}
            assert partial, "the answer appeared in one piece: not streamed"
            assert all("[" not in t and "(답변" not in t for t in seen if t)
            bot = browser.find_elements(By.CSS_SELECTOR, "#log li.bot")[-1]
            wait.until(lambda d: "remembered: [좋아하는 음식: 떡볶이]" in bot.text)

            def items() -> list[str]:
                return browser.execute_script(
                    "return [...document.querySelectorAll('#memories .item')].map(e => e.textContent);")

            wait.until(lambda d: items() == ["[좋아하는 음식: 떡볶이]"])
            assert db.user(user).items == ["[좋아하는 음식: 떡볶이]"]

            browser.find_element(By.CSS_SELECTOR, "#memories button.delete").click()
            wait.until(lambda d: items() == [])
            assert db.user(user).items == []
            assert browser.find_element(By.ID, "empty").is_displayed()
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert errors == []
    finally:
        engine.close()
        db.close()
