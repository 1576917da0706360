"""The README's quick start, as written: `inpaint up` (what `make run` starts once it has installed
everything) on free ports with an empty data folder, then each command block of the README's "Quick
start" section run by bash, as a newcomer would paste it, until the results are files on disk.

Only two things differ from a newcomer's machine: the ports (the suite's own services hold the
defaults) and the key, which the test reads from what `inpaint up` printed, as the README says to.
Without the SD2 weights here, `INPAINT_MODEL=auto` serves the classical inpainter, as it would there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from stack.services import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEFAULT_URL = "http://127.0.0.1:8000"


def quick_start_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


class Up:
    """`inpaint up` in a process group of its own, its output collected line by line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "inpaint"), "up"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            assert self.proc.poll() is None, "inpaint up ended:\n" + "\n".join(self.lines)
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        """Ctrl-C, as the README says; past `inpaint up`'s own shutdown (its children get 30 s each), every
        process it started is killed, Redis and SeaweedFS too (they run in sessions of their own)."""
        tree = psutil.Process(self.proc.pid).children(recursive=True) if self.proc.poll() is None else []
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(150)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for child in tree:
            with contextlib.suppress(psutil.Error):
                child.kill()
        self.reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.mark.timeout(900)
def test_the_readme_quick_start_works_as_written(tmp_path: Path) -> None:
    blocks = quick_start_blocks()
    assert len(blocks) == 3 and "make run" in blocks[0], blocks
    api_port, redis_port, s3_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{api_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INPAINT_", "OTEL_"))}
    env.update(
        INPAINT_DATA_DIR=str(tmp_path / "data"), INPAINT_API_PORT=str(api_port),
        INPAINT_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", INPAINT_S3_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )  # fmt: skip
    up = Up(env)
    try:
        key = up.wait_for(r"API key\s+(ink_\S+)", 180).group(1)
        up.wait_for(r"^\s+model\s", 240)  # a worker is ready

        # The reader's folder: the repository's sample images and virtual environment, nothing else.
        work = tmp_path / "clone"
        work.mkdir()
        shutil.copytree(ROOT / "examples", work / "examples")
        (work / ".venv").symlink_to(VENV_BIN.parent)
        shell = {k: v for k, v in env.items() if k != "PATH"} | {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        shell["INPAINT_URL"] = url  # the client's way to reach a server that is not on the default port
        # One terminal: the blocks run one after the other in the same shell.
        script = "\n".join(blocks[1:]).replace("ink_…", key).replace(DEFAULT_URL, url)
        # `timeout` signals its whole process group: the shell and every command it started.
        run = subprocess.run(["timeout", "-s", "KILL", "300", "bash", "-euo", "pipefail", "-c", script],
                             cwd=work, env=shell, capture_output=True, text=True, timeout=320)  # fmt: skip
        assert run.returncode == 0, f"{script}\n---\n{run.stdout}\n{run.stderr}"
        with Image.open(work / "examples" / "photo.png") as photo:
            size = photo.size
        for name in ("balloon.png", "balloon-curl.png"):
            with Image.open(work / name) as result:
                assert result.size == size and result.format == "PNG", name
    finally:
        up.stop()
    assert up.proc.returncode == 0 and "stopped." in up.lines, "\n".join(up.lines[-20:])
