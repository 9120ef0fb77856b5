"""`osstune serve` as a user starts it (a subprocess on a free loopback port), `osstune chat --url`
against it, and Ctrl-C (SIGINT) stopping it cleanly with a request in flight."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from osstune.cli import build_parser  # noqa: E402
from osstune.serve.cli import parse_adapters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_adapter_flags_are_checked(tmp_path):
    assert parse_adapters([f"a={tmp_path}"]) == {"a": str(tmp_path)}
    for bad in ("nopath", f"a={tmp_path / 'missing'}", "=x"):
        with pytest.raises(ValueError, match="--adapter"):
            parse_adapters([bad])


ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_a_port_in_use_is_said_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "osstune.cli", "serve", "--model", "tiny", "--port", str(port)],
                              env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "pick another --port" in done.stderr
    assert "loading" not in done.stderr
    bad = subprocess.run([sys.executable, "-m", "osstune.cli", "serve", "--model", "tiny", "--port", "99999"],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a TCP port" in bad.stderr


def test_serve_chat_url_and_ctrl_c():
    command = [sys.executable, "-m", "osstune.cli", "serve", "--model", "tiny", "--port", "0", "--api-key", "k",
               "--device", "cpu", "--max-model-len", "256", "--num-kv-blocks", "128", "--max-num-seqs", "8"]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # --port 0: the server says which port it took
            found = re.search(r"osstune serve: (http://127\.0\.0\.1:\d+)/", line)
            if found:
                url = found.group(1)
                break
        else:
            raise AssertionError(f"osstune serve ended without saying where it listens (exit {proc.wait()})")
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "osstune serve did not come up"
            time.sleep(0.2)

        args = build_parser().parse_args(["chat", "--url", url, "--api-key", "k", "--prompt", "Hi!", "--temperature", "0",
                                          "--max-new-tokens", "8", "--reasoning-effort", "low"])
        out = io.StringIO()
        assert args.func(args, stdout=out) == 0
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        same = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi!"}], temperature=0,
                                              max_tokens=8, reasoning_effort="low")
        assert same.choices[0].message.content in out.getvalue()

        body = {"model": "tiny", "messages": [{"role": "user", "content": "Go"}], "max_tokens": 100, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"}, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGINT)  # Ctrl-C with a request in flight
            try:
                list(lines)  # the stream ends: finished within the 5 s of grace, or cut when they are over
            except httpx.RemoteProtocolError:
                pass  # cut: the server cancelled it (and aborted its engine request)
        assert proc.wait(timeout=30) == 0
        assert "osstune serve: stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_serve_and_generate_take_every_engine_option():
    """The flags come from EngineConfig's fields, for both commands: a value given is the config's."""
    import dataclasses

    from osstune.serve.config import EngineConfig
    from osstune.serve.flags import engine_config

    given = ["--block-size", "32", "--num-kv-blocks", "7", "--enable-prefix-caching", "false", "--kernels", "reference"]
    for command in (["serve", "--model", "tiny"], ["generate", "--model", "tiny", "--input", "i", "--output", "o"]):
        args = build_parser().parse_args([*command, *given])
        assert engine_config(args) == EngineConfig(block_size=32, num_kv_blocks=7, enable_prefix_caching=False,
                                                   kernels="reference")
        assert engine_config(build_parser().parse_args(command)) == EngineConfig()
    assert all(f.metadata.get("help") for f in dataclasses.fields(EngineConfig))
