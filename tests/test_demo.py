"""eval/demo.py: which models the page gets (one line for each left out), timed generation, and the page
itself in a real headless Chromium (skipped where Chromium, Selenium or Gradio is missing)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sdkd.cli.errors import UserError
from sdkd.eval.page.models import generate, load_model, load_models, parse_loras, parse_models

from conftest import ROOT, run_script, script_env, selected

INSTALL = 'pip install -c constraints.txt -e ".[dev]"'


@pytest.fixture
def toy(monkeypatch, toy_teacher_dir):
    """`toy` is the toy architecture saved in a temporary folder (random weights: fast, and independent of
    the committed teacher's training)."""
    from sdkd.train.models import toy

    monkeypatch.setattr(toy, "TOY_TEACHER", toy_teacher_dir)
    return toy_teacher_dir


def test_models_and_loras_are_name_equals_path():
    assert parse_models(["teacher=toy", "student = runs/a=b"]) == [("teacher", "toy"), ("student", "runs/a=b")]
    for bad in (["teacher"], ["=toy"], ["teacher="], ["a=toy", "a=toy:bk_small"]):
        with pytest.raises(UserError, match="--models"):
            parse_models(bad)
    assert parse_loras(["student=l.safetensors"], ["teacher", "student"]) == {"student": "l.safetensors"}
    for bad in (["nobody=l.safetensors"], ["student"], ["student=a", "student=b"]):
        with pytest.raises(UserError, match="--lora"):
            parse_loras(bad, ["teacher", "student"])


def test_models_that_cannot_be_shown_get_one_line_each(toy, tmp_path):
    from sdkd.train.models.toy import TOY_UNET, build_random_pipeline

    # Loads, but its U-Net expects 64-wide text embeddings and the text encoder gives 32: fails to generate.
    build_random_pipeline({**TOY_UNET, "cross_attention_dim": 64}, widths="toy").save_pretrained(tmp_path / "odd")
    specs = [("teacher", "toy"), ("gone", str(tmp_path / "nope")), ("student", "toy:bk_small"),
             ("huge", "toy:bk_huge"), ("odd", str(tmp_path / "odd"))]
    models, problems = load_models(specs, tmp_path / "scratch", steps=3, guidance=5.0)
    assert [m.name for m in models] == ["teacher", "student"]
    assert len(problems) == 3 and all("\n" not in line for line in problems), problems
    gone, huge, odd = problems
    assert gone.startswith("model 'gone'") and "not found" in gone
    assert huge.startswith("model 'huge' (toy:bk_huge)") and "no student preset 'bk_huge'" in huge
    assert odd.startswith("model 'odd'") and "cannot generate" in odd
    teacher, student = models
    assert teacher.params == sum(p.numel() for p in teacher.pipe.unet.parameters())
    assert student.params < teacher.params  # bk_small: fewer blocks, its weights the teacher's
    assert (teacher.default_steps, teacher.default_guidance, teacher.one_step) == (3, 5.0, False)
    assert f"U-Net {teacher.params / 1e6:.2f} M params, 32 px" in teacher.describe()
    with pytest.raises(UserError, match="--dtype"):  # concerns every model: stops the start-up
        load_models(specs[:1], tmp_path / "scratch", dtype="fp8")


@pytest.mark.slow  # seconds of its own: the full suite runs it
def test_lora_and_tiny_vae_go_to_the_models_they_fit(toy, tmp_path):
    from diffusers import AutoencoderTiny

    from sdkd.train.formats import lora_io
    from sdkd.train.formats.lora_config import LoraSection
    from sdkd.train.models.toy import build_toy_pipeline

    teacher = build_toy_pipeline()
    lora_io.add_adapters(teacher.unet, None, LoraSection(rank=4))
    lora = lora_io.save_lora(tmp_path / "lora", teacher.unet, None, base="toy")
    specs = [("teacher", "toy"), ("student", "toy:bk_small")]
    models, problems = load_models(specs, tmp_path, loras={"teacher": str(lora), "student": str(lora)})
    assert [m.name for m in models] == ["teacher"] and models[0].pipe.loaded["lora"] == str(lora)
    assert len(problems) == 1 and problems[0].startswith("model 'student'") and "does not fit" in problems[0]
    AutoencoderTiny().save_pretrained(tmp_path / "taesd")
    models, problems = load_models(specs[:1], tmp_path, tiny_vae=str(tmp_path / "taesd"))
    assert not problems and generate(models[0], "x", steps=1).image.size == (128, 128)  # 16 latents, 8x decoder
    AutoencoderTiny(latent_channels=8).save_pretrained(tmp_path / "taesd8")
    models, problems = load_models(specs[:1], tmp_path, tiny_vae=str(tmp_path / "taesd8"))
    assert not models and "its VAE has 8 latent channels, its U-Net takes 4" in problems[0]


def test_one_step_models_start_at_one_step_and_guidance_one(toy_teacher_dir, tmp_path):
    folder = tmp_path / "turbo"
    shutil.copytree(toy_teacher_dir, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "timestep_spacing": "trailing"}))  # how one-step models ship
    model = load_model("turbo", str(folder), tmp_path)
    assert model.one_step and (model.default_steps, model.default_guidance) == (1, 1.0)
    assert not load_model("teacher", str(toy_teacher_dir), tmp_path).one_step


class PipelineClock:
    """A clock that moves only while the pipeline it wraps runs, `seconds` a call: stands for `time` in
    eval/page/models.py, so the seconds a result reports are known whatever the machine's load."""

    def __init__(self, pipe, seconds: float):
        self.pipe, self.seconds, self.now = pipe, seconds, 0.0

    def perf_counter(self) -> float:
        return self.now

    def __call__(self, *args, **kwargs):
        self.now += self.seconds
        return self.pipe(*args, **kwargs)

    def __getattr__(self, name):  # the pipeline's device and settings
        return getattr(self.pipe, name)


def test_generate_is_timed_and_seeded(toy_teacher_dir, tmp_path, monkeypatch):
    """The seconds a result reports are those of the pipeline call, timed from before it to after it; the same seed
    gives the same image, another seed (and negative prompt) another."""
    from sdkd.eval.page import models

    model = load_model("teacher", str(toy_teacher_dir), tmp_path, steps=2)
    clock = PipelineClock(model.pipe, seconds=7.0)
    with monkeypatch.context() as patch:
        patch.setattr(model, "pipe", clock)
        patch.setattr(models, "time", clock)
        first = generate(model, "a red circle", seed=3)
    assert first.image.size == (32, 32) and first.seconds == 7.0
    assert (first.steps, first.guidance) == (2, 7.5)
    again = generate(model, "a red circle", seed=3)
    other = generate(model, "a red circle", negative_prompt="blue", seed=4)
    assert again.image.tobytes() == first.image.tobytes() and other.image.tobytes() != first.image.tobytes()
    one = generate(model, "a red circle", steps=1, guidance=7.5, seed=3)
    assert (one.steps, one.guidance) == (1, 0.0)  # one-step mode: the pipeline turns guidance off
    with pytest.raises(UserError, match="^steps: must be an integer from 1 to 1,000, got 0$"):
        generate(model, "x", steps=0)
    with pytest.raises(UserError, match="^guidance: must be a finite number from 0 to 100, got nan$"):
        generate(model, "x", guidance=float("nan"))  # not run unguided as "guidance nan"
    with pytest.raises(UserError, match=r"^--seed: must be an integer from 0 to [\d,]+, got 18446744073709551616$"):
        generate(model, "x", seed=2**64)


@pytest.mark.slow  # two Python starts; the page test below checks the same in this process
def test_no_model_to_show_exits_2_with_one_line_each(tmp_path):
    # Two independent starts, side by side: each spends its seconds importing torch and diffusers.
    with ThreadPoolExecutor(2) as pool:
        none_loads, bad_spec = pool.map(lambda models: run_script([sys.executable, "eval/demo.py", "--models", *models],
                                                                  timeout=300),
                                        [[f"a={tmp_path / 'nope'}", "b=toy:bk_huge"], ["teacher"]])
    assert none_loads.returncode == 2, none_loads.stdout + none_loads.stderr
    lines = none_loads.stderr.strip().splitlines()
    assert len(lines) == 3, none_loads.stderr
    assert lines[0].startswith("warning: model 'a'") and lines[1].startswith("warning: model 'b'")
    assert lines[2] == "error: none of the 2 models could be loaded (see above)"
    assert bad_spec.returncode == 2 and bad_spec.stderr.strip().splitlines() == [
        "error: --models 'teacher': expected NAME=PATH, e.g. teacher=runs/tiny/student"]


# ---------------------------------------------------------------------------------------------
# The page in a real browser


def _browser_missing() -> tuple[str | None, str | None, str | None]:
    """(Chromium, its chromedriver, None), or what is missing as the third item."""
    for module, name in (("selenium", "Selenium"), ("gradio", "Gradio")):
        if importlib.util.find_spec(module) is None:
            return None, None, f"{name} is not installed: {INSTALL}"
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        return None, None, "no Chromium or chromedriver: apt-get install chromium chromium-driver (docs/testing.md)"
    return chromium, driver, None


def _browser() -> tuple[str, str]:
    """Chromium and its chromedriver (Debian: apt-get install chromium chromium-driver), or skip."""
    chromium, driver, missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    return chromium, driver


def _start_demo(args: list[str], gradio_cache) -> tuple[subprocess.Popen, list[str]]:
    """eval/demo.py as a user starts it; returns the process and its output (still growing). Its Gradio cache
    is its own: another Gradio server on the machine that stops deletes the files it wrote, and the toy images
    (same models, prompt and seed) land at the same paths."""
    env = script_env({"GRADIO_TEMP_DIR": str(gradio_cache)})
    proc = subprocess.Popen([sys.executable, "eval/demo.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    return proc, output


def _address(proc: subprocess.Popen, output: list[str], timeout: float = 600) -> str:
    """The address the demo prints once its page answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if match := re.search(r"^demo: (http://\S+)", "".join(output), re.M):
            return match.group(1)
        time.sleep(0.5)
    proc.kill()
    pytest.fail("eval/demo.py did not start:\n" + "".join(output))


PAGE_TEST = "test_page_in_headless_chromium_shows_one_image_per_model"


@pytest.fixture(scope="module", autouse=True)
def page_demo(request, tmp_path_factory):
    """The demo the browser test opens (the default models: toy teacher, toy student), started at the module's
    start when that test is selected and can run: it loads while the tests above run."""
    if not any(item.name == PAGE_TEST for item in selected(request)) or _browser_missing()[2]:
        yield None
        return
    proc, output = _start_demo(["--steps", "2"], tmp_path_factory.mktemp("gradio"))
    yield proc, output
    if proc.poll() is None:  # the test stops it itself; this is for a test that failed before that
        proc.kill()
        proc.wait()


RESULT = re.compile(r"(\d+\.\d\d) s · (\d+) steps? · guidance (\S+) · U-Net ([\d.]+) ([KMB]) params")


def _results(driver, n: int) -> list[re.Match] | None:
    """Each model's result line, once all `n` are shown."""
    from selenium.webdriver.common.by import By

    found = [RESULT.search(driver.find_element(By.ID, f"info-{i}").text) for i in range(n)]
    return found if all(found) else None


@pytest.mark.e2e
def test_page_in_headless_chromium_shows_one_image_per_model(page_demo, tmp_path, capsys):
    chromium, chromedriver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    proc, output = page_demo  # `eval/demo.py --steps 2`, started with the module
    url = _address(proc, output)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = None
    try:
        driver = webdriver.Chrome(options=options, service=Service(chromedriver))  # no driver download
        driver.get(url)
        wait = WebDriverWait(driver, 300)
        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        assert "teacher" in driver.find_element(By.ID, "model-0").text
        assert "student" in driver.find_element(By.ID, "model-1").text
        assert not driver.find_elements(By.ID, "model-2")
        steps = driver.find_element(By.CSS_SELECTOR, "#steps-1 input")  # the student in one step
        steps.clear()
        steps.send_keys("1")
        prompt.send_keys("a red circle on a blue background")
        clicked = time.perf_counter()
        driver.find_element(By.ID, "generate").click()
        infos = wait.until(lambda d: _results(d, 2))
        shown = time.perf_counter() - clicked  # the models generate one after the other within it
        images = [driver.find_element(By.CSS_SELECTOR, f"#image-{i} img") for i in range(2)]
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im)
                                 for im in images))
        sizes = [driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", im)
                 for im in images]
        shot = tmp_path / "demo.png"
        driver.save_screenshot(str(shot))
        with capsys.disabled():
            print(f"\nscreenshot of the demo page: {shot}")
        assert sizes[0] == sizes[1] and sizes[0][0] >= 32  # the student makes the teacher's size
        seconds = [float(m.group(1)) for m in infos]
        assert min(seconds) > 0 and sum(seconds) <= shown + 0.01, (seconds, shown)  # 0.01: the 2 decimals shown
        # --steps 2 as given; the guidance the toy teacher records (its sdkd_sampling.json: 4)
        assert [(m.group(2), m.group(3)) for m in infos] == [("2", "4"), ("1", "0")]
        assert infos[0].group(5) == infos[1].group(5) and float(infos[1].group(4)) < float(infos[0].group(4))
    finally:
        if driver is not None:
            driver.quit()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, "".join(output)


@pytest.mark.slow  # seconds of its own: the full suite runs it
def test_the_page_has_a_column_per_model_and_its_handler_fills_them_in_turn(toy_teacher_dir, tmp_path, capsys):
    """eval/demo.py and its page without a browser: no model to show stops the command in one line after a warning
    per model; each model's column starts at its own steps and guidance, the models left out are listed, and a
    click shows "generating..." everywhere, then each image with its line."""
    import dataclasses

    import gradio as gr

    from sdkd.eval import demo
    from sdkd.eval.page.layout import build_page
    from sdkd.eval.page.models import format_params

    with pytest.raises(UserError, match=r"^none of the 2 models could be loaded \(see above\)$"):
        demo.main(["--models", f"a={tmp_path / 'nope'}", "b=toy:bk_huge"])
    warnings = capsys.readouterr().err.splitlines()
    assert [line.split("'")[:2] for line in warnings] == [["warning: model ", "a"], ["warning: model ", "b"]]
    teacher = load_model("teacher", str(toy_teacher_dir), tmp_path, steps=2)
    turbo = dataclasses.replace(teacher, name="turbo", one_step=True, default_steps=1, default_guidance=1.0)
    page = build_page([teacher, turbo], problems=["model 'gone' (runs/gone): not found"])
    blocks = {block.elem_id: block for block in page.blocks.values() if getattr(block, "elem_id", None)}
    assert [blocks[f"steps-{i}"].value for i in (0, 1)] == [2, 1]
    assert [blocks[f"guidance-{i}"].value for i in (0, 1)] == [7.5, 1.0]
    assert {f"image-{i}" for i in (0, 1)} <= blocks.keys() and "image-2" not in blocks
    assert any("- model 'gone' (runs/gone): not found" in block.value for block in page.blocks.values()
               if isinstance(block, gr.Markdown))

    (handler,) = [function.fn for function in page.fns.values()]
    shown = [list(step) for step in handler("a red circle", "", 3, 2, 7.5, 1, 1.0)]
    assert len(shown) == 3 and shown[0][1::2] == ["generating...", "generating..."]
    assert shown[1][3] == "generating..." and shown[2][0] is shown[1][0]  # one model after the other
    for i, done in enumerate(["2 steps · guidance 7.5", "1 step · guidance 0"]):  # one step turns guidance off
        line = rf"\*\*\d+\.\d\d s\*\* · {done} · U-Net {re.escape(format_params(teacher.params))} params"
        assert shown[2][2 * i].size == (32, 32) and re.fullmatch(line, shown[2][2 * i + 1]), shown[2]
    assert shown[2][0].tobytes() == generate(teacher, "a red circle", seed=3).image.tobytes()
    with pytest.raises(gr.Error, match="prompt"):
        next(handler("  ", "", 3, 2, 7.5, 1, 1.0))
    with pytest.raises(gr.Error, match=r"prompt: at most 10,000 characters .*\(20,000 characters\)"):
        next(handler("x" * 20_000, "", 3, 2, 7.5, 1, 1.0))  # once for the page, before any model runs
    with pytest.raises(gr.Error, match=r"seed: must be an integer from 0 to [\d,]+, got 18446744073709551616"):
        next(handler("a red circle", "", 2**64, 2, 7.5, 1, 1.0))


# ---------------------------------------------------------------------------------------------
# A flood of requests to the HTTP API


def _post(url: str, body: bytes, timeout: float = 120) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _refused_unread(url: str, length: int) -> int:
    """The status the demo answers a POST announcing a `length`-byte body with, read before any of the body is sent
    (what a client sending `Expect: 100-continue` does). A client that sends the body anyway may instead find the
    connection closed under it, whichever comes first: the server answers without reading the body."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        connection.putrequest("POST", parts.path)
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(length)),
                            ("Expect", "100-continue")):
            connection.putheader(name, value)
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


def _result(url: str, event_id: str) -> str:
    """The event the API's result stream ends with: complete or error."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/{event_id}", timeout=300) as response:
        events = re.findall(r"^event: (\w+)", response.read().decode(), re.M)
    return events[-1]


@pytest.mark.slow  # a Python start (imports, Gradio) and some 50 generations
def test_a_flood_of_requests_leaves_the_demo_serving_with_its_memory_flat(tmp_path):
    """50 requests at once to the demo's API: the valid ones get an image or 503 (the queue holds 16), the
    oversize ones 413 (a megabyte of prompt announced, answered before it is sent), a prompt over 10,000
    characters or a seed over 2**63-1 an error event or 503; afterwards it still answers, its memory grew by less
    than 100 MB, and its log holds no prompt whole."""
    import psutil

    proc, output = _start_demo(["--models", "teacher=toy", "--steps", "1"], tmp_path / "gradio")
    try:
        call = _address(proc, output).rstrip("/") + "/gradio_api/call/run"
        server = psutil.Process(proc.pid)

        def request(prompt: str, seed: int = 0) -> tuple[str, ...]:
            status, body = _post(call, json.dumps({"data": [prompt, "", seed, 1, 4.0]}).encode())
            return (status, _result(call, json.loads(body)["event_id"])) if status == 200 else (status,)

        assert request("a warm-up circle") == (200, "complete")
        before = server.memory_info().rss
        flood = [("a red circle", 0)] * 34 + [("x" * 20_000, 0)] * 3 + [("a red circle", 2**64)] * 3
        megabyte = len(json.dumps({"data": ["x" * 1_000_000, "", 0, 1, 4.0]}).encode())
        with ThreadPoolExecutor(len(flood) + 10) as pool:
            huge = [pool.submit(_refused_unread, call, megabyte) for _ in range(10)]
            answers = list(pool.map(lambda args: request(*args), flood))
            huge = [answer.result() for answer in huge]
        valid, long_prompt, big_seed = answers[:34], answers[34:37], answers[37:]
        assert set(valid) <= {(200, "complete"), (503,)} and (200, "complete") in valid, valid
        assert huge == [413] * 10
        assert set(long_prompt) | set(big_seed) <= {(200, "error"), (503,)}, long_prompt + big_seed
        assert request("a blue circle") == (200, "complete")
        assert server.memory_info().rss - before < 100e6
        log = "".join(output)
        assert "x" * 100 not in log and len(log) < 100_000  # no prompt echoed whole
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
