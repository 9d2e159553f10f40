"""`cm3leon serve` end to end on a briefly trained small model (the shapes
task data of tests/data/task_data.py, with its retrieval index): the HTTP
API against `cm3leon generate`, bad input, batching, a full queue, and the
page driven in Debian's headless chromium."""
from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "tests", "data"))
from conftest import SMALL, run_cli  # noqa: E402
from task_data import shapes_task_data  # noqa: E402

from cm3leon_jax.data.tasks import SHAPES_DATA_ENV  # noqa: E402

PROMPT = "a small red circle above a large blue square"
ARTIFACTS = os.path.join(REPO, "test-artifacts")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, path: str, body=None, raw: bytes = None, timeout: float = 300):
    """(HTTP status, parsed JSON) of a GET (body None) or a JSON POST."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A served model: by default a small model trained here for 8 steps;
    $CM3LEON_SERVE_TEST_MODEL_DIR serves a given one instead (the README's
    screenshot is this test's, run on the demo's model)."""
    given = os.environ.get("CM3LEON_SERVE_TEST_MODEL_DIR")
    if given:
        env, d = {}, os.path.abspath(given)
    else:
        env = {SHAPES_DATA_ENV: shapes_task_data()}
        d = tmp_path_factory.mktemp("model")
        args = [a for a in SMALL if not a.startswith("--gin.MIXTURE_OR_TASK_NAME")]
        run_cli(["train", *args, "--gin.TASK_FEATURE_LENGTHS={'targets': 128}", "--gin.TRAIN_STEPS=8",
                 f"--model_dir={d}"], env=env)
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    # a small queue (3 waiting) and batch (8 rows) so that the tests can fill them
    proc = subprocess.Popen([sys.executable, "-m", "cm3leon_jax.cli", "serve", f"--model_dir={d}",
                             f"--port={port}", "--max_queue=3", "--max_batch_rows=8", "--batch_window_ms=300"],
                            cwd=REPO, env=dict(os.environ, **env), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if call(url, "/api/info", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise AssertionError(f"cm3leon serve did not start (exit {proc.poll()}):\n{log.read()[-5000:]}")
            time.sleep(1)
        yield url, str(d), env, proc
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def _pngs(out: dict) -> list:
    return [base64.b64decode(s["png"]) for s in out["samples"]]


@pytest.mark.slow
def test_generate_is_deterministic_and_equals_cm3leon_generate(served, tmp_path):
    url, model_dir, env, _ = served
    body = {"prompt": PROMPT, "num_samples": 4, "seed": 7, "num_retrieved": 2, "decoding": "mixed",
            "cfg_scale": 2.5, "temperature": 1.2, "top_p": 0.8}
    status, a = call(url, "/api/generate", body)
    assert status == 200, a
    _, b = call(url, "/api/generate", body)
    assert _pngs(a) == _pngs(b) and len(a["samples"]) == 4
    assert len(a["retrieved"]) == 2 and all(d["png"] and d["caption"] for d in a["retrieved"])
    scores = [s["clip_score"] for s in a["samples"]]
    assert scores == sorted(scores, reverse=True)
    _, c = call(url, "/api/generate", dict(body, seed=8))
    assert _pngs(c) != _pngs(a)

    # the command the response shows writes the same PNG bytes
    argv = shlex.split(a["command"])
    assert argv[:2] == ["cm3leon", "generate"] and argv[-1] == "--out=samples"
    for flag in ("--num_samples=4", "--seed=7", "--num_retrieved=2", "--decoding=mixed", "--cfg_scale=2.5",
                 "--temperature=1.2", "--top_p=0.8", f"--prompt={PROMPT}", f"--model_dir={model_dir}"):
        assert flag in argv, (flag, argv)
    run_cli(argv[1:-1] + [f"--out={tmp_path}"], env=env)
    assert _pngs(a) == [(tmp_path / f"000_{rank}.png").read_bytes() for rank in range(4)]


@pytest.mark.slow
def test_requests_sent_together_share_a_batch_and_keep_their_samples(served):
    url, *_ = served
    bodies = [{"prompt": PROMPT, "num_samples": 4, "seed": 3, "decoding": "top_p"},
              {"prompt": "a large green star", "num_samples": 4, "seed": 5, "decoding": "top_p"}]
    alone = [call(url, "/api/generate", b)[1] for b in bodies]
    batches_before = call(url, "/api/info")[1]["batches_run"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda b: call(url, "/api/generate", b), bodies))
    info = call(url, "/api/info")[1]
    assert [s for s, _ in together] == [200, 200]
    assert info["batches_run"] == batches_before + 1 and info["largest_batch"] == 2  # one call for both
    for one, (_, both) in zip(alone, together):
        assert _pngs(one) == _pngs(both)


@pytest.mark.slow
def test_bad_input_gets_4xx_and_the_next_request_is_served(served, tmp_path):
    url, *_ = served
    from PIL import Image

    good = {"prompt": PROMPT, "num_samples": 1}
    png = tmp_path / "x.png"
    Image.new("RGB", (40, 40), "red").save(png)
    image = base64.b64encode(png.read_bytes()).decode()
    cases = [
        ("/api/generate", {"prompt": ""}, 422, "empty"),
        ("/api/generate", {"prompt": "   "}, 422, "empty"),
        ("/api/generate", {"prompt": "x" * 100_000}, 413, "characters"),
        ("/api/generate", {"prompt": "a\udcffb"}, 422, "UTF-8"),
        # within 2,000 characters but not the context: byte-level BPE, 3 tokens a character
        ("/api/generate", {"prompt": "\u20ac" * 1900}, 422, "positions"),
        ("/api/generate", {"prompt": 5}, 422, "string"),
        ("/api/generate", dict(good, num_samples=0), 422, "num_samples"),
        ("/api/generate", dict(good, num_samples=2.5), 422, "num_samples"),
        ("/api/generate", dict(good, cfg_scale=-1), 422, "cfg_scale"),
        ("/api/generate", dict(good, top_p=0), 422, "top_p"),
        ("/api/generate", dict(good, temperature="hot"), 422, "temperature"),
        ("/api/generate", dict(good, decoding="beam"), 422, "decoding"),
        ("/api/generate", dict(good, num_retrieved=99), 422, "num_retrieved"),
        ("/api/generate", dict(good, colour="red"), 422, "unknown"),
        ("/api/generate", [1, 2], 400, "JSON object"),
        ("/api/describe", {"image": base64.b64encode(b"not an image at all").decode()}, 400, "image"),
        ("/api/describe", {"image": "%%% not base64"}, 422, "base64"),
        ("/api/describe", {"image": base64.b64encode(b"\x89PNG" + b"\0" * (9 << 20)).decode()}, 413, "limit"),
        ("/api/describe", {"prompt": "what?"}, 422, "image"),
        ("/api/edit", {"image": image, "prompt": "make it green"}, 400, "fine-tuned"),
    ]
    for path, body, status, words in cases:
        got, out = call(url, path, body)
        assert (got, words.lower() in out.get("error", "").lower()) == (status, True), (path, body if len(
            str(body)) < 200 else "...", got, out)
    got, out = call(url, "/api/generate", raw=b"{not json")
    assert got == 400 and "JSON" in out["error"]
    got, out = call(url, "/api/generate", raw=b"\xff\xfe")
    assert got == 400
    assert call(url, "/api/generate", good)[0] == 200
    got, out = call(url, "/api/describe", {"image": image, "prompt": "Question: what colour?", "max_tokens": 8})
    assert got == 200 and isinstance(out["text"], str)


@pytest.mark.slow
def test_a_full_queue_answers_503_and_the_server_recovers(served):
    url, *_ = served
    body = {"prompt": PROMPT, "num_samples": 8, "decoding": "top_p"}  # a whole batch each: none share
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: call(url, "/api/generate", dict(body, seed=s)), range(8)))
    statuses = sorted(s for s, _ in results)
    # one decoding, three waiting (--max_queue=3); the rest are refused at once
    assert statuses.count(200) >= 3 and 503 in statuses, statuses
    assert all("busy" in out["error"] for s, out in results if s == 503)
    assert call(url, "/api/generate", dict(body, seed=99))[0] == 200


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: `apt-get install chromium "
                    "chromium-driver` (.ci/run installs them)")
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.slow
def test_the_page_in_a_real_browser(served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, model_dir, *_ = served
    driver = _browser()
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 120)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        box.send_keys(PROMPT)
        n = driver.find_element(By.CSS_SELECTOR, "#num_samples input[type=number]")
        n.send_keys(Keys.CONTROL, "a")
        n.send_keys("4", Keys.TAB)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        samples = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#samples img")
                             if len(d.find_elements(By.CSS_SELECTOR, "#samples img")) >= 4 else False)
        assert len(samples) == 4
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#retrieved img")) == 2)  # the page's default
        command = driver.find_element(By.CSS_SELECTOR, "#command textarea").get_attribute("value")
        assert shlex.split(command) == [
            "cm3leon", "generate", f"--model_dir={model_dir}", f"--prompt={PROMPT}", "--num_samples=4",
            "--decoding=mixed", "--cfg_scale=3", "--temperature=1", "--top_p=0.9", "--num_retrieved=2",
            "--seed=0", "--out=samples"]
        os.makedirs(ARTIFACTS, exist_ok=True)
        shot = os.path.join(ARTIFACTS, "serve_page.png")
        driver.save_screenshot(shot)
        assert os.path.getsize(shot) > 10_000
        print(f"screenshot: {shot}")
    finally:
        driver.quit()
