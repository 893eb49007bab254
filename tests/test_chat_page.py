"""The chat page at `GET /` (koala_lib/inference/static/chat.html), driven in headless Chromium against the tiny server.

Needs Debian's `chromium` and `chromium-driver` (`apt-get install -y chromium chromium-driver`) and selenium;
skipped without them. The tiny model is random, so answers are noise: the tests check the page's behaviour
(streaming, history, errors, escaping, the sampling controls), not the text.
"""

from __future__ import annotations


import pytest

pytestmark = pytest.mark.browser

TIMEOUT = 120  # the first answers include jit compilation of the tiny model

# Records, from inside the page, the text length of the newest assistant message on every DOM change:
# more than one distinct non-empty length means the answer was seen growing, i.e. it streamed.
WATCH_GROWTH = """
window.__koalaLengths = [];
const box = document.getElementById('messages');
new MutationObserver(() => {
  const all = box.querySelectorAll('.message.assistant .text');
  if (all.length) window.__koalaLengths.push(all[all.length - 1].textContent.length);
}).observe(box, {subtree: true, childList: true, characterData: true});
"""

# Records the JSON bodies the page posts to /v1/chat/completions.
WATCH_REQUESTS = """
window.__koalaRequests = [];
const original = window.fetch;
window.fetch = function (url, options) {
  if (String(url).includes('/v1/chat/completions') && options && options.body) window.__koalaRequests.push(JSON.parse(options.body));
  return original.apply(this, arguments);
};
"""


@pytest.fixture(scope="module")
def driver(chromium):
    return chromium


# ----------------------------------------------------------------------------- helpers


def wait(driver, condition, timeout: float = TIMEOUT, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message)


def by_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def open_page(driver, url: str, expect_model: str | None = "koala-debug"):
    driver.get(url + "/")
    wait(driver, lambda d: d.execute_script("return document.body.dataset.state") == "idle", 30, "the page did not load")
    if expect_model:
        wait(driver, lambda d: by_css(d, "#model-name")[0].text == expect_model, 30, "the model name did not appear")
    driver.execute_script(WATCH_GROWTH + WATCH_REQUESTS)


def set_value(driver, selector: str, value: str) -> None:
    """Set an input's value as a user would (fires `input` and `change`)."""
    element = by_css(driver, selector)[0]
    driver.execute_script(
        "arguments[0].value = arguments[1];"
        "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));"
        "arguments[0].dispatchEvent(new Event('change', {bubbles: true}));",
        element, value,
    )


def messages(driver) -> list[tuple[str, str]]:
    """(role, text) of every message bubble, in order."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#messages .message')].map(m =>"
        " [m.classList.contains('user') ? 'user' : m.classList.contains('assistant') ? 'assistant' : '?',"
        "  m.querySelector('.text').textContent]);"
    )
    return [tuple(row) for row in rows]


def ask(driver, text: str, *, enter: bool = False) -> dict:
    """Type `text`, send it (Enter or the Send button) and wait for the turn to end.

    Returns the newest assistant message's finish reason and text, the chunks the page counted, and the
    lengths its text was seen at; `finish` is None when the turn ended without an answer (an error)."""
    from selenium.webdriver.common.keys import Keys

    before = len(by_css(driver, "#messages .message.assistant[data-finish]:not([data-finish=''])"))
    errors_before = len(by_css(driver, "#messages .notice.error"))
    driver.execute_script("window.__koalaLengths = []")
    prompt = by_css(driver, "#prompt")[0]
    prompt.clear()
    prompt.send_keys(text)
    if enter:
        prompt.send_keys(Keys.ENTER)
    else:
        by_css(driver, "#send")[0].click()

    def ended(d):
        if d.execute_script("return document.body.dataset.state") != "idle":
            return False
        done = len(by_css(d, "#messages .message.assistant[data-finish]:not([data-finish=''])"))
        return done > before or len(by_css(d, "#messages .notice.error")) > errors_before

    wait(driver, ended, message=f"no answer to {text!r}")
    finished = by_css(driver, "#messages .message.assistant[data-finish]:not([data-finish=''])")
    answered = len(finished) > before
    return {
        "finish": finished[-1].get_attribute("data-finish") if answered else None,
        "text": driver.execute_script("return arguments[0].querySelector('.text').textContent", finished[-1]) if answered else None,
        "chunks": driver.execute_script("return window.__koalaChunks"),
        "lengths": driver.execute_script("return window.__koalaLengths"),
    }


# ----------------------------------------------------------------------------- tests


def test_shows_the_served_model(driver, tiny_server):
    url, _ = tiny_server
    open_page(driver, url)
    assert driver.title == "Koala chat"
    assert by_css(driver, "#model-name")[0].text == "koala-debug"
    assert by_css(driver, "#temperature")[0].get_attribute("value") == "0.7"
    assert by_css(driver, "#max-tokens")[0].get_attribute("value") == "256"
    assert by_css(driver, "#send")[0].is_enabled()
    assert messages(driver) == []


def test_two_turns_stream_and_keep_the_history(driver, tiny_server, tmp_path):
    url, _ = tiny_server
    open_page(driver, url)
    set_value(driver, "#max-tokens", "40")

    first = ask(driver, "Hello Koala, how are you?", enter=True)
    assert first["finish"] in ("stop", "length")
    assert first["text"].strip()
    assert first["chunks"] > 1, "the answer came in one piece: not streamed"
    grown = {n for n in first["lengths"] if n > 0}
    assert len(grown) > 1, f"the answer was never seen growing: lengths {first['lengths']}"
    assert max(grown) == len(first["text"])
    assert by_css(driver, "#send")[0].is_enabled()

    second = ask(driver, "Tell me about eucalyptus.")
    assert second["finish"] in ("stop", "length")
    assert second["text"].strip()
    assert second["chunks"] > 1
    assert len({n for n in second["lengths"] if n > 0}) > 1, f"second answer not streamed: {second['lengths']}"

    assert messages(driver) == [
        ("user", "Hello Koala, how are you?"),
        ("assistant", first["text"]),
        ("user", "Tell me about eucalyptus."),
        ("assistant", second["text"]),
    ]
    # the second request carried the whole conversation and the max-tokens field's value
    sent = driver.execute_script("return window.__koalaRequests")
    assert [r["max_tokens"] for r in sent] == [40, 40]
    assert all(r["stream"] is True and r["model"] == "koala-debug" for r in sent)
    assert sent[1]["messages"] == [
        {"role": "user", "content": "Hello Koala, how are you?"},
        {"role": "assistant", "content": first["text"]},
        {"role": "user", "content": "Tell me about eucalyptus."},
    ]
    if first["finish"] == "length":
        assert any("max-tokens" in n.text for n in by_css(driver, "#messages .notice.note"))

    shot = tmp_path / "chat.png"
    assert driver.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_refused_request_shows_the_error_and_the_page_recovers(driver, tiny_server):
    url, _ = tiny_server
    open_page(driver, url)
    set_value(driver, "#max-tokens", "16")

    refused = ask(driver, "Say something forbidden please")
    assert refused["finish"] is None
    error = by_css(driver, "#messages .notice.error")[-1].text
    assert "moderation" in error and "400" in error
    assert driver.execute_script("return document.body.dataset.state") == "idle"
    assert by_css(driver, "#send")[0].is_enabled()

    after = ask(driver, "Then say something nice.")
    assert after["finish"] in ("stop", "length") and after["text"].strip()
    # the refused turn is not sent again (the history still alternates user / assistant)
    sent = driver.execute_script("return window.__koalaRequests")
    assert sent[-1]["messages"] == [{"role": "user", "content": "Then say something nice."}]
    assert [role for role, _ in messages(driver)] == ["user", "user", "assistant"]


def test_message_text_is_not_html(driver, tiny_server):
    url, _ = tiny_server
    open_page(driver, url)
    set_value(driver, "#max-tokens", "8")
    payload = "<script>window.__pwned=1</script><b>bold</b>"
    reply = ask(driver, payload)
    assert reply["finish"] in ("stop", "length")
    user = by_css(driver, "#messages .message.user")[-1]
    assert "<script>" in user.text and "<b>bold</b>" in user.text
    assert by_css(driver, "#messages .message.user b") == []
    assert by_css(driver, "#messages script") == []
    assert driver.execute_script("return typeof window.__pwned") == "undefined"


def test_temperature_and_repetition_controls_are_sent(driver, tiny_server):
    url, _ = tiny_server
    open_page(driver, url)
    set_value(driver, "#max-tokens", "20")
    assert by_css(driver, "#penalty-value")[0].text == "0.3"
    slider = by_css(driver, "#temperature")[0]
    driver.execute_script("arguments[0].value = '0'; arguments[0].dispatchEvent(new Event('input'));", slider)
    assert by_css(driver, "#temperature-value")[0].text == "0.0"
    penalty = by_css(driver, "#penalty")[0]
    driver.execute_script("arguments[0].value = '1.2'; arguments[0].dispatchEvent(new Event('input'));", penalty)
    assert by_css(driver, "#penalty-value")[0].text == "1.2"

    question = "What do koalas eat?"
    answers = []
    for _ in range(2):
        by_css(driver, "#new-chat")[0].click()
        wait(driver, lambda d: messages(d) == [], 10, "New chat did not clear the conversation")
        reply = ask(driver, question)
        assert reply["finish"] in ("stop", "length") and reply["text"].strip()
        answers.append(reply["text"])
    assert answers[0] == answers[1], "greedy decoding (temperature 0) gave two different answers"

    sent = driver.execute_script("return window.__koalaRequests")
    assert [(r["temperature"], r["frequency_penalty"], r["max_tokens"]) for r in sent] == [(0, 1.2, 20), (0, 1.2, 20)]
    # each new chat starts from an empty history
    assert all(r["messages"] == [{"role": "user", "content": question}] for r in sent)


def test_api_key_is_sent_as_a_bearer_header(driver, tiny_generator):
    from koala_lib import config
    from koala_lib.conditioning.template import template_for
    from koala_lib.inference.serve import create_app, serving

    template = template_for(config.load("smoke"), tiny_generator.tokenizer)
    app = create_app(tiny_generator, template, model_name="koala-locked", api_key="sesame")
    with serving(app) as url:
        open_page(driver, url, expect_model=None)
        driver.execute_script("localStorage.clear()")
        wait(driver, lambda d: "API key" in by_css(d, "#model-name")[0].text, 30, "no hint that a key is needed")

        set_value(driver, "#max-tokens", "8")
        refused = ask(driver, "Hello?")
        assert refused["finish"] is None
        assert "401" in by_css(driver, "#messages .notice.error")[-1].text

        set_value(driver, "#api-key", "sesame")
        wait(driver, lambda d: by_css(d, "#model-name")[0].text == "koala-locked", 30, "the key did not unlock /v1/models")
        assert driver.execute_script("return localStorage.getItem('koala-chat.api-key')") == "sesame"
        answered = ask(driver, "Hello again?")
        assert answered["finish"] in ("stop", "length") and answered["text"].strip()

        # the key survives a reload
        driver.refresh()
        wait(driver, lambda d: by_css(d, "#model-name")[0].text == "koala-locked", 30, "the stored key was not used")
        assert by_css(driver, "#api-key")[0].get_attribute("value") == "sesame"
        driver.execute_script("localStorage.clear()")


def test_an_answer_cut_by_moderation_is_marked(driver, tiny_generator):
    from koala_lib import config
    from koala_lib.conditioning.template import template_for
    from koala_lib.inference.serve import create_app, serving

    # lets the request through (it contains the pass word) and flags any answer once it has a few characters
    def moderation(text: str) -> str | None:
        return None if "wombat" in text or len(text) < 3 else "answers are not allowed here"

    template = template_for(config.load("smoke"), tiny_generator.tokenizer)
    app = create_app(tiny_generator, template, model_name="koala-debug", moderation=moderation)
    with serving(app) as url:
        open_page(driver, url)
        set_value(driver, "#max-tokens", "30")
        reply = ask(driver, "Tell me about the wombat.")
        assert reply["finish"] == "content_filter"
        assert len(reply["text"]) < 3 + 20  # cut at the token that crossed the limit
        note = by_css(driver, "#messages .notice.note")[-1].text
        assert "moderation" in note
        assert by_css(driver, "#messages .notice.error") == []
        # the cut answer stays in the history, so the next turn is accepted
        again = ask(driver, "And the wombat's burrow?")
        assert again["finish"] == "content_filter"
        sent = driver.execute_script("return window.__koalaRequests")
        assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "user"]
