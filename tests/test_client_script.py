"""`pip install ./client` gives the client commands as `inpaint-client`; the server's `inpaint` keeps the
operator's commands and has the client's too. No server is needed here (tests/test_client.py runs them
against one)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from importlib.metadata import distribution
from pathlib import Path

from inpaint_client import calls
from inpaint_client import cli as client_cli

from stack import cli as operator_cli
from stack.services import free_port

ROOT = Path(__file__).resolve().parents[1]


def scripts(pyproject: Path) -> dict[str, str]:
    return tomllib.loads(pyproject.read_text())["project"]["scripts"]  # type: ignore[no-any-return]


def commands(parser: argparse.ArgumentParser) -> set[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_the_client_declares_its_own_script_name():
    client, server = scripts(ROOT / "client" / "pyproject.toml"), scripts(ROOT / "pyproject.toml")
    assert client == {"inpaint-client": "inpaint_client.cli:main"}
    assert server["inpaint"] == "stack.cli:main"
    assert not client.keys() & server.keys()  # one venv holds both (make run): neither replaces the other
    # as installed here (make reinstalls the client when its pyproject.toml changes)
    installed = {
        ep.name: ep.value for ep in distribution("inpaint-client").entry_points if ep.group == "console_scripts"
    }
    assert installed == client


def test_inpaint_has_every_client_command_and_the_operators():
    client = commands(client_cli.build_parser())
    assert client == {"submit", "status", "cancel", "delete", "jobs", "batch", "models", "lora"}
    assert commands(operator_cli.build_parser()) >= client | {"up", "keys", "model", "compose-gpus"}


def test_the_installed_script_runs_and_reports_an_unreachable_api_in_one_line():
    script = Path(sys.executable).parent / "inpaint-client"
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "submit" in out.stdout and "batch" in out.stdout, out.stderr
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = subprocess.run([script, "status", "0" * 32, "--url", url], capture_output=True, text=True, timeout=60)
    assert out.returncode == client_cli.EXIT_ERROR
    assert out.stderr.startswith("error: ConnectError:") and len(out.stderr.splitlines()) == 1, out.stderr


def test_submit_names_a_model_and_loras_by_id_url_and_scale():
    args = client_cli.build_parser().parse_args([
        "submit", "i.png", "m.png", "a pear", "--model", "sdxl-inpainting", "--lora", "ab12", "--lora", "ab12:0.5",
        "--lora", "https://example.com/a.safetensors:-1.5", "--lora", "https://example.com:8443/b.safetensors"])  # fmt: skip
    assert args.model == "sdxl-inpainting"
    call = calls.submit(b"img", b"mask", "a pear", None, {}, args.model, args.loras)
    assert call.kwargs["json"]["model"] == "sdxl-inpainting"
    assert call.kwargs["json"]["loras"] == [
        {"id": "ab12"}, {"id": "ab12", "scale": 0.5}, {"url": "https://example.com/a.safetensors", "scale": -1.5},
        {"url": "https://example.com:8443/b.safetensors"}]  # fmt: skip
    plain = calls.submit(b"img", b"mask", "a pear", None, {}).kwargs["json"]
    assert "model" not in plain and "loras" not in plain  # the deployment's default, no adapter
    upload = calls.upload_lora(b"\x00" * 8, "style")
    assert (upload.method, upload.path, upload.kwargs["params"]) == ("POST", "/v1/loras", {"name": "style"})
    assert upload.kwargs["headers"]["content-type"] == "application/octet-stream"
