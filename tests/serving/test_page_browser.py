"""The page `gpt2 serve` shows at `/`, in a real browser: headless Chromium from the system's packages (`chromium`,
`chromium-driver`, as `.ci/apt-packages.txt` lists them) driven by Selenium, against a real server process.

One browser session for every check: a wrong key is refused with the server's message, a chat message gets a streamed
reply, Stop ends a reply in progress, and the completion playground shows each token's probability on hover.
Set GPT2_PAGE_SCREENSHOT=FILE.png to keep a screenshot of the chat (docs/images/chat-page.png is one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import pytest

from conftest import biased_model, cli_env

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the test extra)")

API_KEY = "page-key"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,  # a server process and a browser: CI runs it, `-m "not slow"` leaves it out
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)",
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from gpt2cli.formats.chat_template import CHAT_TEMPLATE_METADATA_KEY, ChatTemplate

    # The model says " the" and " cat" (never <|endoftext|>): a reply lasts as long as its max_tokens.
    checkpoint = biased_model(
        tmp_path_factory.mktemp("page") / "chatty.safetensors",
        {262, 3797},
        block_size=1024,
        metadata={CHAT_TEMPLATE_METADATA_KEY: ChatTemplate.default().source},
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2cli", "serve", str(checkpoint), "--port", "0", "--api-key", API_KEY],
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(OMP_NUM_THREADS="1"),
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if " on http://" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(120):
            raise RuntimeError("the server did not start:\n" + "".join(lines))
        yield next(line for line in lines if " on http://" in line).split(" on ")[1].split()[0]
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,720"):
        options.add_argument(argument)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root inside its sandbox
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def visible(driver, element_id: str) -> bool:
    return driver.find_element("id", element_id).is_displayed()


def test_key_chat_stop_and_completion_in_a_browser(server, browser):
    driver = browser
    driver.get(server + "/")

    # The server has --api-key: the page asks for it, and a wrong one is refused with the server's message.
    wait_for(driver, lambda d: visible(d, "key-dialog"))
    driver.find_element("id", "key-input").send_keys("wrong")
    driver.find_element("id", "key-save").click()
    wait_for(driver, lambda d: "incorrect API key" in d.find_element("id", "key-message").text)
    assert visible(driver, "key-dialog")
    key_input = driver.find_element("id", "key-input")
    key_input.clear()
    key_input.send_keys(API_KEY)
    driver.find_element("id", "key-save").click()
    wait_for(driver, lambda d: "chatty" in d.find_element("id", "status").text)
    assert not visible(driver, "key-dialog") and not visible(driver, "error")

    # A checkpoint with a chat template opens on the chat view; a message gets a streamed reply.
    wait_for(driver, lambda d: visible(d, "chat-view"))
    set_number(driver, "max-tokens", 12)
    driver.find_element("id", "chat-input").send_keys("Hello there\n")
    wait_for(driver, lambda d: visible(d, "chat-send"))  # the reply has ended
    user, assistant = driver.find_elements("css selector", "#chat-log .message")
    assert user.text == "Hello there"
    assert set(assistant.text.split()) <= {"the", "cat"} and len(assistant.text.split()) == 12
    assert not visible(driver, "error")
    hover(driver, assistant.find_elements("css selector", ".token")[0])  # chat's logprobs: {token, logprob, ...}
    assert "p = 0.5" in driver.find_element("id", "tooltip").text  # " the" and " cat", even odds

    # Stop ends a long reply while it streams; the conversation goes on.
    set_number(driver, "max-tokens", 900)
    driver.find_element("id", "chat-input").send_keys("Go on\n")
    wait_for(driver, lambda d: len(last_message(d).text.split()) >= 3)
    driver.find_element("id", "chat-stop").click()
    wait_for(driver, lambda d: visible(d, "chat-send"))
    stopped = last_message(driver)
    assert "stopped" in stopped.get_attribute("class") and len(stopped.text.split()) < 900
    if screenshot := os.environ.get("GPT2_PAGE_SCREENSHOT"):
        driver.save_screenshot(screenshot)

    # The completion playground: the continuation streams in, each token's probability on hover.
    driver.find_element("id", "tab-completion").click()
    set_number(driver, "max-tokens", 6)
    driver.find_element("id", "prompt-input").send_keys("Once upon a time")
    driver.find_element("id", "complete-send").click()
    wait_for(driver, lambda d: visible(d, "complete-send"))
    tokens = driver.find_elements("css selector", "#completion-output .token")
    assert len(tokens) == 6 and all(0 < float(token.get_attribute("data-p")) <= 1 for token in tokens)
    hover(driver, tokens[0])
    assert "p = " in driver.find_element("id", "tooltip").text
    assert not visible(driver, "error")


def last_message(driver):
    return driver.find_elements("css selector", "#chat-log .message")[-1]


def set_number(driver, element_id: str, value: int) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(str(value))


def hover(driver, element) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).move_to_element(element).perform()
    wait_for(driver, lambda d: visible(d, "tooltip"))
