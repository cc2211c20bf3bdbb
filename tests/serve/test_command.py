"""`arx serve` as a command: refusals in one line (exit 2) before anything is loaded, the serve
extra named when FastAPI is missing, and a real server process stopped by Ctrl-C (exit 130)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from cli_lines import ARX_AT_A_TERMINAL, assert_one_line
from core.test_needs import arx_without


def test_without_fastapi_names_the_serve_extra(exported_bundle):
    proc = arx_without(("fastapi",), "serve", str(exported_bundle("llama")))
    assert_one_line(proc, "arx serve needs", "'fastapi'", "pip install 'arx[serve]'")


def test_ray_without_ray_names_the_ray_extra(exported_bundle):
    proc = arx_without(("ray",), "serve", str(exported_bundle("llama")), "--ray", "--port", "0")
    assert_one_line(proc, "arx serve --ray needs", "'ray'", "pip install 'arx[ray]'")


@pytest.mark.parametrize("argv,fragment", [
    (["--max-batch", "0"], "--max-batch, --prefill-chunk and --prefill-chunk-idle must be >= 1"),
    (["--prefill-chunk-idle", "0"], "(got 8, 32, 0)"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--max-queue", "-1"], "--max-queue must be >= 0"),
])
def test_bad_options_are_one_line(exported_bundle, argv, fragment):
    proc = subprocess.run([sys.executable, "-m", "arx", "serve", str(exported_bundle("llama")),
                           *argv], capture_output=True, text=True, timeout=120)
    assert_one_line(proc, fragment)


def test_an_address_in_use_is_one_line(exported_bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "arx", "serve", str(exported_bundle("llama")),
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert_one_line(proc, f"cannot listen on 127.0.0.1:{port}", "pick another --port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_until_ctrl_c(exported_bundle):
    port = _free_port()
    proc = subprocess.Popen(ARX_AT_A_TERMINAL + ["serve", str(exported_bundle("llama")), "--port",
                                                  str(port), "--max-batch", "2", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    assert json.loads(r.read())["status"] == "ok"
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        body = json.dumps({"model": "llama", "prompt": [5, 6, 7], "max_tokens": 4,
                           "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert len(json.loads(r.read())["choices"][0]["token_ids"]) >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "arx: interrupted"
    assert "Traceback" not in err
