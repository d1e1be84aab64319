"""`nekotune ui` in a real headless Chromium: Debian's chromium and chromium-driver, driven by selenium.

The app runs in this process on a free port with a tiny random Llama (wide initialisation, so
answers are varied words). Screenshots are saved in each test's tmp directory (printed with -s).
No test races the machine's speed: streaming is checked by what the server sent, and training
is held at chosen steps (a gate in its callback) while the page is looked at.
Install what it needs with:
    apt-get install -y chromium chromium-driver fonts-wqy-zenhei   (the font only draws the Chinese labels)
    .venv/bin/pip install gradio selenium
"""

from __future__ import annotations

import copy
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import build_tiny

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Without the background-networking flags Chromium keeps dialling Google hosts on a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1200"]
CHAT_TOKENS = 160  # an answer of many pieces
INSTALL_HINT = "apt-get install -y chromium chromium-driver && .venv/bin/pip install gradio selenium"


def _missing() -> str | None:
    import importlib.util

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        return f"{CHROMIUM} or {CHROMEDRIVER} not installed; run: {INSTALL_HINT}"
    for module in ("selenium", "gradio"):
        if importlib.util.find_spec(module) is None:
            return f"python package {module} not installed; run: {INSTALL_HINT}"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_wide(smol_tokenizer, tmp_path_factory) -> Path:
    return build_tiny("llama", smol_tokenizer, tmp_path_factory.mktemp("ui-tiny"), init_std=0.3)


@pytest.fixture(scope="module")
def ui(tiny_wide, tmp_path_factory):
    from nekotune.config import load_config
    from nekotune.ui.app import build_app, launch

    outputs = tmp_path_factory.mktemp("ui-outputs")
    cfg = load_config(None, [f"output.root={outputs}", f"generate.max_new_tokens={CHAT_TOKENS}",
                             "generate.temperature=0", "output.tensorboard=false", "output.plot=false"],
                      default_to_demo=False)
    app = build_app(cfg, model_arg=str(tiny_wide))
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "app": app, "outputs": outputs, "model": tiny_wide}
    app.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    # An explicit chromedriver path: selenium then never tries to download a driver.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# -- helpers ---------------------------------------------------------------------------------
def open_tab(driver, url: str, name: str) -> None:
    driver.get(url)
    switch_tab(driver, name)


def switch_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    tab = wait_until(lambda: [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                              if b.text.startswith(name)], 60, f"tab {name}")
    tab[0].click()


def wait_until(check, timeout: float, what: str, every: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def type_into(driver, selector: str, text, enter: bool = False) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, selector), 30, selector)[0]
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(text))
    if enter:
        field.send_keys(Keys.ENTER)


def click(driver, selector: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, selector).click()


def text_of(driver, selector: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[-1].text if found else ""


def screenshot(driver, path: Path) -> Path:
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    print(f"\nscreenshot: {path}")
    return path


def reference_answer(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    from nekotune.config import load_config
    from nekotune.data.formats import Conversation, Turn
    from nekotune.generate import GenSettings, generate
    from nekotune.model import load_for_inference

    loaded = load_for_inference(load_config(None, [], default_to_demo=False), str(model_dir))
    settings = GenSettings.from_config(loaded.cfg.generate, temperature=0.0, max_new_tokens=max_new_tokens)
    return generate(loaded.model, loaded.renderer, Conversation(turns=[Turn("user", prompt)]), settings)


# -- what the server does, seen from inside --------------------------------------------------
@pytest.fixture
def chat_updates(monkeypatch):
    """Every update the Chat event streams to the page (each yield of chat_reply is one message)."""
    import nekotune.ui.tabs as ui_app

    record = {"updates": [], "done": threading.Event()}
    original = ui_app.chat_reply

    def recording(*args, **kwargs):
        for update in original(*args, **kwargs):
            record["updates"].append(copy.deepcopy(update))
            yield update
        record["done"].set()

    monkeypatch.setattr(ui_app, "chat_reply", recording)  # looked up by the page's handler at each call
    return record


class TrainingGate:
    """Holds a training right after chosen steps until the test lets it go on."""

    def __init__(self, steps):
        self.held = {step: threading.Event() for step in steps}
        self.go = {step: threading.Event() for step in steps}

    def wait_held(self, step: int) -> None:
        wait_until(self.held[step].is_set, 300, f"training to reach step {step}")

    def release(self, step: int) -> None:
        self.go[step].set()

    def release_all(self) -> None:
        for event in self.go.values():
            event.set()


@pytest.fixture
def training_gate(monkeypatch):
    from nekotune.ui.workspace import TrainingJob

    gates = []
    original = TrainingJob._callback

    def gated(job):
        progress = original(job)
        gate = gates[-1]

        class Gated(type(progress)):
            def on_step_end(self, args, state, control, **kw):
                super().on_step_end(args, state, control, **kw)  # the page's state shows this step first
                if state.global_step in gate.held:
                    gate.held[state.global_step].set()
                    gate.go[state.global_step].wait(300)

        return Gated()

    monkeypatch.setattr(TrainingJob, "_callback", gated)

    def make(*steps) -> TrainingGate:
        gates.append(TrainingGate(steps))
        return gates[-1]

    yield make
    for gate in gates:
        gate.release_all()


def _words(text: str) -> str:
    return re.sub(r"\W+", "", text)  # markdown may draw punctuation differently; letters stay


# -- tests -----------------------------------------------------------------------------------
def test_chat_streams_the_reply(browser, ui, tmp_path, chat_updates):
    open_tab(browser, ui["url"], "Chat")
    type_into(browser, "#chat-input textarea", "Hello there, who are you?", enter=True)
    wait_until(chat_updates["done"].is_set, 120, "the answer to be generated")
    answers = [shown[-1]["content"] for shown, _ in chat_updates["updates"]
               if shown and shown[-1]["role"] == "assistant"]
    final = answers[-1]
    assert final.strip(), "the bot answered nothing"
    # Streamed: the server sent the answer in several growing pieces, each extending the last.
    assert len({len(a) for a in answers}) >= 3, answers
    assert all(final.startswith(a) for a in answers)
    # The page shows the whole answer once the stream has ended.
    wait_until(lambda: _idle(browser) and _words(text_of(browser, "#chatbot [data-testid=bot]")) == _words(final),
               60, "the whole answer on the page")
    assert text_of(browser, "#chatbot [data-testid=user]") == "Hello there, who are you?"
    screenshot(browser, tmp_path / "ui-chat.png")


def _idle(driver) -> bool:
    """Gradio marks a component `.generating` and shows its status tracker while an event streams."""
    return driver.execute_script(
        "return document.querySelectorAll('.generating').length === 0 && Array.from(document.querySelectorAll("
        "'#chatbot [data-testid=status-tracker]')).every(e => e.classList.contains('hide'))")


def test_training_shows_progress_and_loss_curve(browser, ui, qa_file, tmp_path, training_gate):
    gate = training_gate(3, 6)
    open_tab(browser, ui["url"], "Train")
    type_into(browser, "#train-model textarea", ui["model"])
    type_into(browser, "#train-data textarea", qa_file)
    for field, value in (("max-steps", 20), ("lr", 0.005), ("r", 4), ("seq", 128), ("batch", 4)):
        type_into(browser, f"#train-{field} input", value)
    click(browser, "#train-start")
    # Held at steps 3 and 6, the page must show each while the training runs: progress updates live.
    for step in (3, 6):
        gate.wait_held(step)
        wait_until(lambda: re.search(rf"running.*\b{step}/20\b", text_of(browser, "#train-status"), re.S), 60,
                   f"the page to show step {step} of a running training")
        gate.release(step)
    status = wait_until(lambda: (lambda s: s if any(w in s for w in ("finished", "error", "stopped")) else None)(
        text_of(browser, "#train-status")), 300, "training to finish", every=0.1)
    assert "finished" in status and "20/20" in status, status
    # The loss curve: one point per logged step, drawn by the plot as a line.
    wait_until(lambda: browser.execute_script(
        "return document.querySelectorAll('#loss-plot svg path').length > 2 && "
        "document.querySelector('#loss-plot [aria-label*=\"step\"]') !== null"), 30, "the loss curve")
    axis = browser.execute_script("return document.querySelector('#loss-plot [aria-label*=\"X-axis\"]')"
                                  ".getAttribute('aria-label')")
    assert "step" in axis
    screenshot(browser, tmp_path / "ui-train.png")
    runs = [d for d in ui["outputs"].iterdir() if (d / "adapter" / "adapter_model.safetensors").is_file()]
    assert len(runs) == 1


def test_compare_puts_models_side_by_side(browser, ui, tmp_path):
    """The base model and the run just trained answer the same prompt, each as it does in-process."""
    from selenium.webdriver.common.by import By

    run = next(d for d in ui["outputs"].iterdir() if (d / "adapter").is_dir())
    prompt = "Question number 3?"
    expected = {name: reference_answer(path, prompt, CHAT_TOKENS)
                for name, path in ((ui["model"].name, ui["model"]), (run.name, run))}
    open_tab(browser, ui["url"], "Chat")
    click(browser, "#chat-refresh")  # the run appeared after the page was built
    switch_tab(browser, "Compare")
    label = wait_until(lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, "#compare-models label")
                                if e.text.strip() == run.name], 30, "the new run in the model list")
    label[0].click()
    type_into(browser, "#compare-prompt textarea", prompt)
    click(browser, "#compare-run")

    def table():
        heads = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#compare-table th")]
        cells = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#compare-table td")]
        return dict(zip(heads, cells, strict=False)) if len(cells) == 2 and "…" not in cells else None

    shown = wait_until(table, 120, "both answers")
    assert {k: " ".join(v.split()) for k, v in shown.items()} == {k: " ".join(v.split()) for k, v in expected.items()}
    assert shown[run.name] != shown[ui["model"].name]  # the adapter changed the answer
    screenshot(browser, tmp_path / "ui-compare.png")


def test_stop_button_stops_training(browser, ui, qa_file, training_gate):
    gate = training_gate(2)
    open_tab(browser, ui["url"], "Train")
    type_into(browser, "#train-model textarea", ui["model"])
    type_into(browser, "#train-data textarea", qa_file)
    type_into(browser, "#train-max-steps input", 5000)
    type_into(browser, "#train-lr input", 0.005)
    click(browser, "#train-start")
    gate.wait_held(2)  # held mid-run, so Stop is pressed while it trains, however fast the machine
    wait_until(lambda: "running" in text_of(browser, "#train-status"), 60, "the page to show the training running")
    click(browser, "#train-stop")
    wait_until(lambda: ui["app"].workspace.job.flag.requested, 60, "the stop request to reach the training")
    gate.release(2)
    status = wait_until(lambda: (lambda s: s if "stopped" in s or "finished" in s else None)(
        text_of(browser, "#train-status")), 120, "training to stop")
    assert "stopped" in status and "checkpoint" in status and "/5000" in status


# -- issue 17: an image in the chat (vision-language models) ---------------------------------
@pytest.fixture(scope="module")
def vlm_ui(smol_dir, tmp_path_factory):
    from vision_fixtures import build_tiny_vlm, noise_image, save_image

    from nekotune.config import load_config
    from nekotune.ui.app import build_app, launch

    model = build_tiny_vlm("qwen3_vl", smol_dir, tmp_path_factory.mktemp("ui-vlm"))
    image = save_image(noise_image(64, 96), tmp_path_factory.mktemp("ui-img") / "photo.png")
    cfg = load_config(None, [f"output.root={tmp_path_factory.mktemp('ui-vlm-outputs')}", "generate.max_new_tokens=8",
                             "generate.temperature=0"], default_to_demo=False)
    app = build_app(cfg, model_arg=str(model))
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "image": image}
    app.close()


def test_chat_with_an_uploaded_image(browser, vlm_ui, tmp_path, chat_updates, monkeypatch):
    from selenium.webdriver.common.by import By

    import nekotune.generate as gen

    got = []
    real_stream = gen.stream

    def recording(model, renderer, conv, settings, stop=None, inputs=None):
        got.append(inputs["image_grid_thw"].tolist() if inputs and "image_grid_thw" in inputs else None)
        yield from real_stream(model, renderer, conv, settings, stop=stop, inputs=inputs)

    monkeypatch.setattr(gen, "stream", recording)
    open_tab(browser, vlm_ui["url"], "Chat")
    upload = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-image input[type=file]"), 30, "upload")
    upload[0].send_keys(str(vlm_ui["image"]))
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-image img"), 30, "the uploaded image's preview")
    type_into(browser, "#chat-input textarea", "What is in the picture?", enter=True)
    wait_until(chat_updates["done"].is_set, 120, "the answer to be generated")
    assert got and got[0] is not None and len(got[0]) == 1  # the model got the image's pixels
    shown = chat_updates["updates"][-1][0]
    assert isinstance(shown[0]["content"], list) and "path" in shown[0]["content"][0]
    wait_until(lambda: _idle(browser) and browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=user] img"),
               60, "the image in the chat")
    assert not browser.find_elements(By.CSS_SELECTOR, "#chat-image img")  # cleared after sending
    screenshot(browser, tmp_path / "ui-image-chat.png")
