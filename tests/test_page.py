"""The page at `/`, in a real browser: Debian's chromium driven by Playwright (never a browser download),
against the API served by uvicorn, a real worker with tiny-random, Redis and S3."""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from shared.jobs.inputs import unpack
from tests.conftest import KEYS, make_pair, png_bytes

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    assert CHROMIUM, "chromium is not installed: `make install` installs it (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


WATCH = """() => {
  window.__seen = []; window.__progress = [];
  new MutationObserver(() => window.__seen.push(document.getElementById('status').textContent))
    .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true});
  new MutationObserver(() => window.__progress.push(Number(document.getElementById('progress').value)))
    .observe(document.getElementById('progress'), {attributes: true});
}"""


def wait_js(page: Any, expression: str, timeout: float = 30) -> None:
    """Until `expression` is true in the page. Polled from here: Playwright's wait_for_function builds
    its predicate with eval, which the page's Content-Security-Policy (rightly) forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"never true: {expression}"
        time.sleep(0.05)


def test_paint_submit_watch_and_compare(http_api, browser, tmp_path, store, storage):
    img, _ = make_pair(128, 96)
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes(img))
    page = browser.new_page(viewport={"width": 1100, "height": 1400})  # type: ignore[attr-defined]
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(http_api + "/")
    assert page.title() == "inpaint"
    page.fill("#api-key", KEYS["alice"])
    page.click("#key-form button")
    assert page.text_content("#key-state") == "key saved"
    # the model picker: the served models from GET /v1/models, the default chosen, its workers said
    # (the picker fills when the key's GET /v1/models answers: the state line may change before that)
    wait_js(
        page,
        "document.querySelectorAll('#model-pick option').length > 0 && document.getElementById('model-state').textContent !== ''",
    )
    options = page.evaluate("[...document.querySelectorAll('#model-pick option')].map(o => [o.value, o.textContent])")
    assert options == [["inpaint/tiny-random", "tiny-random (default)"]]
    assert page.input_value("#model-pick") == "inpaint/tiny-random"
    assert page.text_content("#model-state").startswith("1 worker ready")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#stage:not([hidden])")
    box = page.locator("#mask-canvas").bounding_box()
    assert box is not None
    # one stroke across the middle of the picture
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    for f in (0.4, 0.5, 0.6, 0.7):
        page.mouse.move(box["x"] + box["width"] * f, box["y"] + box["height"] * 0.5, steps=3)
    page.mouse.up()
    page.fill("#steps", "40")
    page.fill("#seed", "7")
    page.evaluate(WATCH)
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden])", timeout=90_000)
    wait_js(page, "document.getElementById('after').complete && document.getElementById('after').naturalWidth > 0")
    seen = page.evaluate("window.__seen")
    assert any(s.startswith("Running: step") for s in seen), seen
    assert seen[-1].startswith("Done"), seen
    assert max(page.evaluate("window.__progress")) > 0
    download = page.get_attribute("#download", "href")
    assert download.startswith("http") and "response-content-disposition=attachment" in download
    saved = httpx.get(download)  # the browser saves it, it does not navigate away from the page
    assert saved.status_code == 200 and saved.headers["content-disposition"].startswith("attachment")
    assert page.text_content("#model").startswith("Model: tiny-random@") and page.is_hidden("#fallback")
    assert "Done" not in " ".join(errors) and not errors, errors

    # what the page sent: the uploaded image as is, and a mask white exactly along the stroke
    job_id = store.list_ids("alice", 1, None)[0]
    rec = store.get(job_id)
    assert rec is not None and rec.input.num_inference_steps == 40 and rec.input.seed == 7
    assert rec.input.model == "inpaint/tiny-random" and rec.model_name == "tiny-random" and not rec.input.loras
    image, mask_png = unpack(storage.get(rec.image_key))  # one stored object (shared/jobs/inputs.py)
    assert image == path.read_bytes()
    mask = np.asarray(Image.open(io.BytesIO(mask_png)).convert("L"))
    assert mask.shape == (96, 128) and set(np.unique(mask)) == {0, 255}
    assert mask[48, 64] == 255 and mask[5, 5] == 0 and mask[90, 120] == 0

    page.click("#refresh")
    wait_js(page, "document.querySelectorAll('#jobs li').length > 0")
    assert "succeeded" in page.text_content("#jobs li")
    page.screenshot(path=str(ROOT / "docs" / "page.png"), full_page=True)
    page.close()


def test_undo_invert_and_errors_are_shown(http_api, browser, tmp_path):
    path = tmp_path / "p.png"
    path.write_bytes(png_bytes(make_pair(64, 64)[0]))
    page = browser.new_page()  # type: ignore[attr-defined]
    page.goto(http_api + "/")
    page.evaluate("localStorage.setItem('inpaint.apiKey', 'wrong-key')")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#stage:not([hidden])")
    count = "(() => { const c = document.getElementById('mask-canvas'); const d = c.getContext('2d')" \
            ".getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; })()"  # fmt: skip
    page.click("#submit")
    assert "Paint the area" in page.text_content("#status")  # nothing painted: nothing sent
    page.click("#invert")
    assert page.evaluate(count) == 64 * 64
    page.click("#undo")
    assert page.evaluate(count) == 0
    page.click("#invert")
    page.click("#submit")
    wait_js(page, "document.getElementById('status').textContent.startsWith('Error')")
    assert "unauthorized" in page.text_content("#status")
    # a LoRA upload the API refuses says why, and nothing is kept for the next job
    (tmp_path / "style.safetensors").write_bytes(b"not an adapter")
    page.set_input_files("#lora-file", str(tmp_path / "style.safetensors"))
    wait_js(page, "document.getElementById('lora-state').textContent.startsWith('Not uploaded')")
    assert "unauthorized" in page.text_content("#lora-state") and page.is_hidden("#lora-clear")
    page.close()
