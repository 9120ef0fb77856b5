"""The web chat page in a real browser: Debian's chromium, headless, driven by selenium, against a
live server (real engine, tiny random model). Typing a message shows the streamed answer; Stop
ends a reply and frees its request in the engine."""

from __future__ import annotations

import shutil
import time

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
openai = pytest.importorskip("openai")

from tests.serve_live import live_server, scripted_model, wait_idle  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver; .ci/run installs them)",
)
KEY = "page-key"


@pytest.fixture(scope="module")
def driver():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def browser_and_server(driver):
    with live_server(api_key=KEY) as (url, ctx):
        yield driver, url, ctx


def _wait(driver, condition, timeout=60.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    shown = driver.find_elements("id", "status")
    where = f"its status line: {shown[0].text!r}" if shown else f"the page is not ours: {driver.page_source[:300]!r}"
    raise AssertionError(f"timed out waiting in the page; {where}")


def _set(driver, element_id, value):
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(str(value))


def test_typing_a_message_streams_the_answer_and_stop_ends_it(browser_and_server):
    from selenium.webdriver.common.keys import Keys

    driver, url, ctx = browser_and_server
    driver.get(url + "/")
    _wait(driver, lambda: driver.title == "osstune chat")  # a loaded machine may return from get() early
    _wait(driver, lambda: "models:" in driver.find_element("id", "status").text)  # 401 until the key is given
    _set(driver, "api-key", KEY)
    driver.find_element("id", "api-key").send_keys(Keys.TAB)  # "change": the models load with the key
    _wait(driver, lambda: driver.find_elements("css selector", "#model option"))
    _set(driver, "temperature", 0)
    _set(driver, "max-tokens", 56)  # past the 40 tokens after which output that is no header streams as text
    driver.find_element("css selector", "#effort option[value=high]").click()

    box = driver.find_element("id", "input")
    box.send_keys("Hello there")
    box.send_keys(Keys.ENTER)
    answer = driver.find_elements("css selector", ".msg.assistant")[-1]
    # Streamed: text is on the page before the reply has finished.
    _wait(driver, lambda: answer.find_element("css selector", ".content").text and not answer.get_attribute("data-finish"))
    _wait(driver, lambda: answer.get_attribute("data-finish"))
    shown = answer.find_element("css selector", ".content").get_attribute("textContent")  # .text trims

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    same = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                          reasoning_effort="high", temperature=0, max_tokens=56)
    assert shown == same.choices[0].message.content  # the page shows what the API answers
    assert answer.get_attribute("data-finish") == same.choices[0].finish_reason

    _set(driver, "max-tokens", 300)  # the prompt now holds the first turn: 512 tokens in all
    box.send_keys("Go on")
    box.send_keys(Keys.ENTER)
    second = _wait(driver, lambda: driver.find_elements("css selector", ".msg.assistant")[1:])[-1]
    stop = driver.find_element("id", "stop")
    _wait(driver, lambda: stop.is_enabled())
    time.sleep(0.5)  # the request is in the engine
    stop.click()
    _wait(driver, lambda: second.get_attribute("data-finish"))
    assert second.get_attribute("data-finish") == "stopped"
    stats = wait_idle(ctx.engine)
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and ctx.metrics.in_flight == 0


def test_reasoning_is_shown_folded(driver):
    """A scripted model that writes analysis messages (see test_serve_tool_calls.py)."""
    from openai_harmony import Role
    from selenium.webdriver.common.keys import Keys

    from osstune.data.render import harmony_encoding

    enc = harmony_encoding()
    cycle = enc.encode("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant", allowed_special="all")
    with live_server(model=scripted_model([cycle[-1], *cycle])) as (url, ctx):
        driver.get(url + "/")
        _wait(driver, lambda: driver.find_elements("css selector", "#model option"))
        _set(driver, "max-tokens", 2 * len(cycle) - 2)  # two analysis messages
        box = driver.find_element("id", "input")
        box.send_keys("Weather?")
        box.send_keys(Keys.ENTER)
        answer = driver.find_elements("css selector", ".msg.assistant")[-1]
        _wait(driver, lambda: answer.get_attribute("data-finish"))
        details = answer.find_element("css selector", "details")
        shown = details.find_element("css selector", "div").get_attribute("textContent")
    messages = enc.parse_messages_from_completion_tokens((cycle * 2)[: 2 * len(cycle) - 2], Role.ASSISTANT)
    assert shown == "\n".join(m.content[0].text for m in messages)
    assert details.is_displayed() and details.get_attribute("open") is None  # there, and folded
    assert answer.get_attribute("data-finish") == "length"
