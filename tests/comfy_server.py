"""The real ComfyUI server as users run it (`main.py` on 127.0.0.1), with this pack and the demo models.

Used by the HTTP test (test_comfy_server.py) and the browser tests (test_comfy_browser.py). The server
runs in its own process group, with its own output/input/temp/user folders, and is always stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from scripts.comfy_headless import default_comfyui_dir, link_pack, write_extra_paths_yaml
from tests.comfy_harness import demo_models, require_comfyui, session_dir

STARTUP_TIMEOUT = 180


@dataclass
class Server:
    base: str
    work: Path
    process: subprocess.Popen

    @property
    def log(self) -> str:
        return (self.work / "server.log").read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(f"{self.base}{path}", timeout=10) as r:
            return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(name: str, input_files: dict[str, bytes] | None = None,
                   env: Callable[[Path], dict[str, str]] | None = None) -> Iterator[Server]:
    """Start ComfyUI's main.py (CPU) with the pack and the demo models; `input_files` go into its input
    folder first (the frontend lists them when it loads); `env(work folder)` adds environment variables.
    Yields once /system_stats answers."""
    require_comfyui()
    work = session_dir(name)
    yaml = write_extra_paths_yaml(work / "extra_model_paths.yaml", demo_models(), link_pack(work / "custom_nodes"))
    for d in ("output", "input", "temp", "user"):
        (work / d).mkdir()
    for file, data in (input_files or {}).items():
        (work / "input" / file).write_bytes(data)
    port = _free_port()
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--extra-model-paths-config", str(yaml), "--disable-auto-launch", "--disable-api-nodes",
           "--output-directory", str(work / "output"), "--input-directory", str(work / "input"),
           "--temp-directory", str(work / "temp"), "--user-directory", str(work / "user"),
           "--database-url", "sqlite:///:memory:"]
    with open(work / "server.log", "wb") as log:
        process = subprocess.Popen(cmd, cwd=default_comfyui_dir(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, **(env(work) if env else {})})
        server = Server(f"http://127.0.0.1:{port}", work, process)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while True:
                assert process.poll() is None, "ComfyUI exited during startup:\n" + server.log[-3000:]
                try:
                    server.get("/system_stats")
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    assert time.monotonic() < deadline, "ComfyUI did not start in time"
                    time.sleep(0.5)
            yield server
        finally:
            os.killpg(process.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=20)
