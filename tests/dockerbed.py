"""A Docker engine and images made on this host, for tests/test_compose.py.

What such a host offers (measured on the development VM and CI): Debian's `docker.io` runs as root,
but no registry can be reached (nothing can be pulled) and a build's container cannot reach the
package index. So:

- the engine: the one already answering, else a `dockerd` of our own, on its own socket and data root,
  with `--iptables=false` (its FORWARD rules would cut the network namespaces of tests/test_hosts.py)
  and no default bridge; it is stopped at the end, its images kept for the next run;
- a base image from `debootstrap --variant=minbase` (Debian 12: python3 3.11, like the host's venv),
  with redis-server and SeaweedFS's `weed` for the two services whose images cannot be pulled;
- a wheelhouse of exactly the versions in the host's venv (`pip download -c <pip freeze>`), served on
  the host's loopback to builds that run with the host's network.

The base image and the wheelhouse are made on the first run only (minutes: debootstrap, every wheel of
the worker's stack), then kept. Each step prints a line when it starts and ends, and has a limit of its
own (LIMITS_S) sized for that first run: a slow step fails on its own limit, naming itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from stack.services import weed_binary

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("INPAINT_TEST_CACHE", "/var/cache/inpaint-test"))
SOCKET = "/run/inpaint-test-docker.sock"
BASE_PACKAGES = ("python3", "python3-venv", "libglib2.0-0", "libgl1", "redis-server", "ca-certificates")
# Seconds each step may take on a first run, nothing cached yet (a later run skips the last three).
LIMITS_S = {"engine": 120, "debootstrap": 900, "import": 600, "wheelhouse": 1200}
QUICK_S = 60  # a query of the engine: docker info, image inspect


class Unavailable(RuntimeError):
    """This host cannot run the compose test (and says why)."""


@contextmanager
def step(what: str) -> Iterator[None]:
    """A line when a step starts and one when it ends (pytest shows them with -s, or on a failure)."""
    print(f"compose test: {what} …", flush=True)
    started = time.monotonic()
    yield
    print(f"compose test: {what}: {time.monotonic() - started:.0f} s", flush=True)


def run(*args: str, timeout: float = 600, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:4])} … exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def docker_cli() -> str:
    """Debian's client, of the same release as its engine, else whichever is on PATH."""
    found = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")
    if not found:
        raise Unavailable("no docker client (apt-get install docker.io)")
    return found


def compose_cli() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run([docker_cli(), "compose", "version"], capture_output=True)
    if probe.returncode == 0:
        return [docker_cli(), "compose"]
    raise Unavailable("no docker compose (apt-get install docker-compose)")


@contextmanager
def engine(log: Path) -> Iterator[dict[str, str]]:
    """The environment for docker/compose commands that reach a running engine."""
    env = dict(os.environ)
    if _answers(env):
        yield env
        return
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        raise Unavailable("no Docker engine answers, and this user cannot start one (root and docker.io needed)")
    env["DOCKER_HOST"] = f"unix://{SOCKET}"
    args = ["dockerd", f"--host=unix://{SOCKET}", "--data-root=/var/lib/inpaint-test-docker",
            "--exec-root=/run/inpaint-test-docker", "--pidfile=/run/inpaint-test-docker.pid",
            "--iptables=false", "--ip-masq=false", "--bridge=none"]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with step("starting dockerd"):
            deadline = time.monotonic() + LIMITS_S["engine"]
            while not _answers(env):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise Unavailable(f"dockerd did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run([docker_cli(), "info"], capture_output=True, env=env, timeout=QUICK_S).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _mirror() -> str:
    """The Debian mirror this host's apt uses (it is the one reachable), else deb.debian.org."""
    for source in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if source.exists():
            for line in source.read_text().splitlines():
                if line.startswith(("URIs:", "deb ")):
                    for word in line.split():
                        if word.startswith("http") and "security" not in word:
                            return word
    return "http://deb.debian.org/debian"


def base_image(env: dict[str, str]) -> str:
    """`inpaint-test-base:<hash>`: Debian 12 minbase with BASE_PACKAGES and `weed`; made once, then kept."""
    weed = Path(weed_binary())
    # the packages and which weed (its size and time: reading a 100 MB binary to name an image is waste)
    stat = weed.stat()
    digest = hashlib.sha256(f"{BASE_PACKAGES}{stat.st_size}{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    tag = f"inpaint-test-base:{digest}"
    inspect = [docker_cli(), "image", "inspect", tag]
    if subprocess.run(inspect, capture_output=True, env=env, timeout=QUICK_S).returncode == 0:
        return tag
    if not shutil.which("debootstrap"):
        raise Unavailable("no debootstrap (apt-get install debootstrap)")
    rootfs = CACHE / f"rootfs-{digest}"
    shutil.rmtree(rootfs, ignore_errors=True)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    with step(f"debootstrap of Debian 12 for {tag} (first run only)"):
        run("debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(rootfs),
            _mirror(), timeout=LIMITS_S["debootstrap"])  # fmt: skip
    shutil.copy2(weed, rootfs / "usr" / "local" / "bin" / "weed")
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):  # debootstrap's downloads: not in the image
        deb.unlink()
    with step(f"docker import of {tag}"):
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([docker_cli(), "import", "--change", "ENV LANG=C.UTF-8", "-", tag], stdin=tar.stdout,
                                  capture_output=True, text=True, env=env, timeout=LIMITS_S["import"])  # fmt: skip
        tar.wait(QUICK_S)
    assert tar.stdout is not None
    tar.stdout.close()
    if imported.returncode != 0:
        raise RuntimeError(f"docker import: {imported.stderr}")
    shutil.rmtree(rootfs, ignore_errors=True)
    return tag


def wheelhouse() -> Path:
    """Wheels of every package the two images install, at the versions of this venv (torch: its CPU build)."""
    frozen = run(sys.executable, "-m", "pip", "freeze", "--exclude-editable")
    pins = "\n".join(ln for ln in frozen.splitlines() if "==" in ln and not ln.startswith("inpaint"))
    digest = hashlib.sha256(pins.encode()).hexdigest()[:12]
    wheels = CACHE / f"wheels-{digest}"
    if (wheels / ".complete").exists():
        return wheels
    wheels.mkdir(parents=True, exist_ok=True)
    constraints = wheels / "constraints.txt"
    constraints.write_text(pins + "\n")
    with step(f"pip download of the wheelhouse {wheels.name} (first run, or new versions in the venv)"):
        run(sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), "-c", str(constraints),
            "--only-binary=:all:", str(ROOT / "client"), f"{ROOT}[worker]", "setuptools", "wheel",
            "async-timeout",  # redis wants it below Python 3.11.3: Debian 12 has 3.11.2, this venv may be newer
            timeout=LIMITS_S["wheelhouse"])  # fmt: skip
    for local in wheels.glob("inpaint*"):  # the project itself is built in the image, from its source
        local.unlink()
    (wheels / ".complete").touch()
    return wheels


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """`directory` over HTTP on loopback: pip's --find-links URL."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
