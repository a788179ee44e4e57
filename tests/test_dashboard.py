"""Our dashboard page in a real browser (Debian's chromium, driven by Playwright), in real runs."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import make_input, on_workers, write_factory, write_workflow

import blockpredict
from blockpredict.dashboard import build_document
from blockpredict.events import read_events
from blockpredict.live import STATE_COLORS

CHROMIUM = "/usr/bin/chromium"
SRC = str(Path(blockpredict.__file__).resolve().parents[1])
DONE_RGB = tuple(int(STATE_COLORS[2][i : i + 2], 16) for i in (1, 3, 5))

needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="Debian's chromium is not installed here (.ci/run installs it with apt as root)",
)

# collects the text of a page, through Bokeh's shadow roots
PAGE_TEXT = """() => {
  const out = [];
  const walk = (n) => {
    if (n.nodeName === "STYLE" || n.nodeName === "SCRIPT") return;
    if (n.nodeType === 3) out.push(n.textContent);
    if (n.shadowRoot) walk(n.shadowRoot);
    for (const c of n.childNodes) walk(c);
  };
  walk(document.body);
  return out.join(" ");
}"""


def setup_run(tmp_path: Path, cluster: dict) -> Path:
    """64 blocks of 8^3 that take 0.8 s each; block 0 fails (a marked voxel)."""
    write_factory(tmp_path, "slow_page")  # a name of its own: shared workers cache modules
    data = np.random.default_rng(0).random((34, 34, 34), dtype=np.float32)
    data[2, 2, 2] = 1000.0
    make_input(tmp_path / "in.zarr" / "raw", data, (1, 1, 1))
    return write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": {"factory": "slow_page:build", "kwargs": {"delay": 0.8}},
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": cluster,
            "execution": {"max_retries": 0, "fail_fast": 0},
        },
    )


class Run:
    """``blockpredict predict`` in a subprocess; its stderr lines collected as they come."""

    def __init__(self, tmp_path: Path, workflow: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blockpredict.cli", "predict", str(workflow), *args],
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.log = tmp_path / "out.zarr" / "pred-events.jsonl"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def url(self, label: str, timeout: float = 120) -> str:
        return self.line(rf"{label}: (http\S+)", timeout).group(1)

    def line(self, pattern: str, timeout: float = 120) -> re.Match:
        """The first stderr line that matches ``pattern``, waited for."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                if m := re.match(pattern, line):
                    return m
            assert self.proc.poll() is None, "".join(self.lines)
            time.sleep(0.1)
        raise AssertionError(f"no line {pattern!r}:\n" + "".join(self.lines))

    def wait_finished(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if sum(e["event"] == "block_finished" for e in read_events(self.log)) >= n:
                return
            time.sleep(0.1)
        raise AssertionError("the run did not get going:\n" + "".join(self.lines))

    def end(self) -> int:
        code = self.proc.wait(timeout=300)
        self.reader.join(10)
        return code


def done_count(text: str) -> int:
    match = re.search(r"done (\d+)/64", text)
    assert match, text
    return int(match.group(1))


def done_pixels(png: Path) -> int:
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"))
    return int((np.abs(pixels.astype(int) - DONE_RGB).sum(axis=-1) <= 6).sum())


@pytest.fixture(scope="module")
def chromium():
    """One chromium for the module; each test gets a page of its own (``browser``)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def browser(chromium):
    page = chromium.new_page(viewport={"width": 1300, "height": 1100})
    yield page
    page.close()


def check_our_page(page, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    """The block map shows done blocks, the failed block is listed, and it updates."""
    time.sleep(4)
    text = page.evaluate(PAGE_TEXT)
    assert "blockpredict: running" in text and "skipped by resume" in text, text  # the legend
    assert "failed blocks (1)" in text and "ValueError: marked voxel in this block" in text, text
    first = done_count(text)
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    block_map = page.locator(".blockpredict-block-map")
    assert block_map.count() == 1
    shot = tmp_path / f"{name}-block-map.png"
    block_map.screenshot(path=str(shot))
    assert done_pixels(shot) > 2000  # done blocks drawn in the block map
    time.sleep(3)
    assert done_count(page.evaluate(PAGE_TEXT)) > first  # live


@needs_chromium
def test_our_page_in_the_dashboard_of_a_local_run(tmp_path, browser):
    """... and with --dashboard-linger, the page shows the final state after the run, until
    Ctrl-C, which ends the process with the run's exit code."""
    cluster = {"type": "local", "n_workers": 2, "dashboard_address": "127.0.0.1:0"}
    run = Run(tmp_path, setup_run(tmp_path, cluster), "--dashboard-linger", "300")
    try:
        status = run.url("dashboard")
        ours = run.url("blockpredict page")
        assert ours == status.rsplit("/", 1)[0] + "/blockpredict"
        run.wait_finished(12)  # layer z = 0 has done blocks (Morton order)
        listening = [
            c.laddr.ip
            for p in [psutil.Process(run.proc.pid), *psutil.Process(run.proc.pid).children(True)]
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening and set(listening) <= {"127.0.0.1", "::1"}, listening
        browser.goto(status)
        time.sleep(4)
        text = browser.evaluate(PAGE_TEXT)
        assert "Task Stream" in text and "needs bokeh" not in text, text  # it rendered
        browser.screenshot(path=str(tmp_path / "status.png"))
        link = browser.locator("#myTopnav a[href*=blockpredict]")
        assert link.count() == 1
        link.click()
        browser.wait_for_url("**/blockpredict")
        check_our_page(browser, tmp_path, "local")
        run.line(r"up until 300 s after the run: the page stays up", timeout=180)
        browser.goto(ours)  # a visitor after the run
        time.sleep(3)
        text = browser.evaluate(PAGE_TEXT)
        assert "blockpredict: ended" in text and "done 63/64" in text, text
        assert "blocks: 63/64 done" in text, text  # the run's summary
        browser.screenshot(path=str(tmp_path / "local-ended.png"), full_page=True)
        assert run.proc.poll() is None  # still lingering
    finally:
        if run.proc.poll() is None:  # lingering, or about to: Ctrl-C closes the page
            with contextlib.suppress(AssertionError):
                run.line(r".*the page stays up", timeout=180)
            run.proc.send_signal(signal.SIGINT)
        code = run.end()
    assert code == 1, "".join(run.lines)  # one block failed: Ctrl-C only closed the page
    assert "Traceback" not in "".join(run.lines)


@needs_chromium
def test_a_run_on_an_existing_scheduler_serves_the_page_itself(tmp_path, browser, cluster_address):
    cluster = on_workers(cluster_address, tmp_path)  # the shared workers find slow_page.py
    run = Run(tmp_path, setup_run(tmp_path, cluster))
    try:
        ours = run.url("blockpredict page")
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/blockpredict", ours)
        run.wait_finished(12)  # layer z = 0 has done blocks (Morton order)
        browser.goto(ours)
        check_our_page(browser, tmp_path, "address")
    finally:
        code = run.end()
    assert code == 1, "".join(run.lines)
    text = browser.evaluate(PAGE_TEXT)  # the open tab kept the final state
    assert "blockpredict: ended" in text and "done 63/64" in text, text


def test_rates_read_as_plain_numbers_from_zero():
    """Not 1.06868e+6: Bokeh's default formatter goes scientific from 1e5 (the voxel rate);
    and the time axis reads as clock times on a short run."""
    from bokeh.document import Document
    from bokeh.models import NumeralTickFormatter, Plot

    doc = Document()
    build_document(doc, lambda: None)
    titles = {p.title.text: p for p in doc.select({"type": Plot}) if p.title is not None}
    for title in ("output voxels/s", "blocks/s"):
        (formatter,) = [axis.formatter for axis in titles[title].yaxis]
        assert isinstance(formatter, NumeralTickFormatter), (title, formatter)
        assert formatter.format == "0.[00]a"  # numbro: 1068680 -> 1.07m, 0.5 -> 0.5
        assert titles[title].y_range.start == 0
        (clock,) = [axis.formatter for axis in titles[title].xaxis]  # not "500ms" over a date
        assert clock.milliseconds == "%H:%M:%S.%3N" and clock.context is None
