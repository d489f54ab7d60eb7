"""The real ComfyUI server as users run it: `main.py` on 127.0.0.1, a workflow queued over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from scripts.comfy_headless import (
    PACK_NAME,
    default_comfyui_dir,
    link_pack,
    ui_to_api,
    write_extra_paths_yaml,
)
from tests.comfy_harness import LOADER_INPUTS, T2I, WORKFLOWS, demo_models, require_comfyui, session_dir
from zimage_core.demo_weights import DEMO_FILES

STARTUP_TIMEOUT = 180
RUN_TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, payload: dict):
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class _ObjectInfoClasses(dict):
    """ui_to_api needs each node's INPUT_TYPES; over HTTP they come from /object_info."""

    def __init__(self, info: dict) -> None:
        super().__init__()
        for name, node in info.items():
            spec = {section: {k: tuple(v) for k, v in node["input"].get(section, {}).items()}
                    for section in ("required", "optional")}
            self[name] = type(name, (), {"INPUT_TYPES": classmethod(lambda cls, s=spec: s)})


def test_server_runs_a_workflow_over_http():
    require_comfyui()
    work = session_dir("server-test")
    yaml = write_extra_paths_yaml(work / "extra_model_paths.yaml", demo_models(), link_pack(work / "custom_nodes"))
    for d in ("output", "input", "temp", "user"):
        (work / d).mkdir()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "wb")
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--extra-model-paths-config", str(yaml), "--disable-auto-launch", "--disable-api-nodes",
           "--output-directory", str(work / "output"), "--input-directory", str(work / "input"),
           "--temp-directory", str(work / "temp"), "--user-directory", str(work / "user"),
           "--database-url", "sqlite:///:memory:"]
    server = subprocess.Popen(cmd, cwd=default_comfyui_dir(), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert server.poll() is None, "ComfyUI exited during startup:\n" + (work / "server.log").read_text()[-3000:]
            try:
                stats = _get(f"{base}/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "ComfyUI did not start in time"
                time.sleep(0.5)
        assert stats["system"]["comfyui_version"]

        info = _get(f"{base}/object_info")
        _assert_readme_node_table_matches(info)
        sampler = info["ZImageTurboSampler"]
        assert sampler["category"].startswith("Z-Image")
        assert sampler["input"]["required"]["seed"][1]["tooltip"]
        assert sampler["python_module"] == f"custom_nodes.{PACK_NAME}"
        templates = _get(f"{base}/workflow_templates")
        assert sorted(templates[PACK_NAME]) == sorted(p.stem for p in WORKFLOWS.glob("*.json"))
        with urllib.request.urlopen(f"{base}/api/workflow_templates/{PACK_NAME}/{T2I.name}", timeout=10) as r:
            assert json.loads(r.read())["nodes"]
        extensions = _get(f"{base}/extensions")
        assert any(e.endswith("zimage.js") for e in extensions)

        prompt = ui_to_api(json.loads(T2I.read_text()), _ObjectInfoClasses(info))
        for node in prompt.values():
            if node["class_type"] in LOADER_INPUTS:
                name, folder = LOADER_INPUTS[node["class_type"]]
                node["inputs"][name] = DEMO_FILES[folder]
            if node["class_type"] == "ZImageEmptyLatent":
                node["inputs"].update(width=48, height=32, preset="custom")
        status, queued = _post(f"{base}/prompt", {"prompt": prompt, "client_id": "zimage-test"})
        assert status == 200, queued
        prompt_id = queued["prompt_id"]
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            history = _get(f"{base}/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    break
            assert time.monotonic() < deadline, "the workflow did not finish in time"
            time.sleep(0.5)
        assert entry["status"]["status_str"] == "success", entry["status"]
        images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
        assert len(images) == 1
        from PIL import Image

        path = work / "output" / images[0]["subfolder"] / images[0]["filename"]
        assert Image.open(path).size == (48, 32)

        # A rejected prompt (size not divisible by 16 fails at run time; empty model name at validation).
        bad = json.loads(json.dumps(prompt))
        for node in bad.values():
            if node["class_type"] == "ZImageModelLoader":
                node["inputs"]["model_name"] = "missing.safetensors"
        status, answer = _post(f"{base}/prompt", {"prompt": bad})
        assert status == 400 and answer["node_errors"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
        log.close()


def _assert_readme_node_table_matches(info: dict) -> None:
    """README's node table lists exactly our nodes, with the output types /object_info reports."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Nodes"):readme.index("## Workflows")]
    # "→ `TYPE`" or, for several outputs, "→ `TYPE`, `TYPE`"
    rows = {name: re.findall(r"`(\w+)`", outputs)
            for name, outputs in re.findall(r"^\| `(\w+)` \|.*→ (`\w+`(?:, `\w+`)*) \|", table, re.M)}
    ours = {name: node for name, node in info.items() if node.get("python_module") == f"custom_nodes.{PACK_NAME}"}
    assert set(rows) == set(ours), "README's node table and /object_info list different nodes"
    for name, output in rows.items():
        assert ours[name]["output"] == output, f"{name}: README says {output}, ComfyUI {ours[name]['output']}"
