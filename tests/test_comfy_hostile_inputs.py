"""What a web client can send a real ComfyUI server (main.py on 127.0.0.1): nothing it uploads or queues runs
code or slips past a widget's bounds.

One server for the module, started with ZIMAGE_COMPILE_CACHE pointing inside <user>/default (the folder
/userdata writes to), the setting that turned the compile cache into remote code execution.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.comfy_server import running_server
from tests.hostile_cache import crafted_cache
from zimage_core.demo_weights import DEMO_FILES

RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def server():
    env = lambda work: {"ZIMAGE_COMPILE_CACHE": str(work / "user" / "default" / "zimage_compile_cache")}  # noqa: E731
    with running_server("hostile-inputs", env=env) as s:
        yield s


def _request(server, path: str, data: bytes, content_type: str = "application/json"):
    req = urllib.request.Request(f"{server.base}{path}", data, {"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _queue(server, prompt: dict) -> tuple[int, dict]:
    # allow_nan: a client can send NaN/Infinity (Python's JSON reader, ComfyUI's, accepts them).
    status, body = _request(server, "/prompt", json.dumps({"prompt": prompt}, allow_nan=True).encode())
    return status, json.loads(body)


def _wait(server, prompt_id: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        history = server.get(f"/history/{prompt_id}")
        entry = history.get(prompt_id)
        if entry is not None and entry["status"].get("completed") is not None:
            return entry
        assert time.monotonic() < deadline, "the prompt did not finish in time"
        time.sleep(0.5)


def _error_of(entry: dict) -> str:
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data['node_type']}: {data['exception_message']}"
    return ""


def _t2i(**extra) -> dict:
    """A small text-to-image prompt in API format; `extra` adds nodes or replaces inputs."""
    prompt = {
        "1": {"class_type": "ZImageModelLoader", "inputs": {"model_name": DEMO_FILES["diffusion_models"],
                                                             "weight_dtype": "default"}},
        "2": {"class_type": "ZImageTextEncoderLoader", "inputs": {"text_encoder_name": DEMO_FILES["text_encoders"]}},
        "3": {"class_type": "ZImageVAELoader", "inputs": {"vae_name": DEMO_FILES["vae"]}},
        "4": {"class_type": "ZImageTextEncode", "inputs": {"text_encoder": ["2", 0], "text": "a red cube"}},
        "5": {"class_type": "ZImageEmptyLatent", "inputs": {"width": 32, "height": 32, "preset": "custom",
                                                             "batch_size": 1}},
        "6": {"class_type": "ZImageTurboSampler", "inputs": {"model": ["1", 0], "positive": ["4", 0],
                                                              "latent": ["5", 0], "seed": 1, "steps": 1,
                                                              "shift": 3.0, "guidance": 0.0}},
        "7": {"class_type": "ZImageVAEDecode", "inputs": {"vae": ["3", 0], "latent": ["6", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    for nid, node in extra.items():
        if nid in prompt and "class_type" not in node:
            prompt[nid]["inputs"].update(node)
        else:
            prompt[nid] = node
    return prompt


def test_a_compile_cache_file_uploaded_through_userdata_never_runs(server, tmp_path):
    from zimage_core.accel.compile_cache import environment_key

    pickled = server.work / "marker-pickle-ran"
    written = server.work / "marker-abs-key-written"
    data = crafted_cache(pickled, written)
    # As a web client: /userdata writes under <user>/default, where ZIMAGE_COMPILE_CACHE points.
    for name in (f"{environment_key()}-{'0' * 64}.bin", f"{environment_key()}-planted.bin"):
        path = urllib.parse.quote(f"zimage_compile_cache/{name}", safe="")
        status, body = _request(server, f"/userdata/{path}?overwrite=true", data, "application/octet-stream")
        assert status == 200, body
    assert (server.work / "user" / "default" / "zimage_compile_cache" / name).read_bytes() == data
    # (Files planted on the file system in the default folder: test_comfy_acceleration.py.)

    status, queued = _queue(server, _t2i(**{"9": {"class_type": "ZImageCompileModel",
                                                  "inputs": {"model": ["1", 0], "mode": "default"}},
                                            "6": {"model": ["9", 0]}}))
    assert status == 200, queued
    entry = _wait(server, queued["prompt_id"])
    assert entry["status"]["status_str"] == "success", _error_of(entry)
    assert not pickled.exists() and not written.exists(), "a planted compile-cache file ran"
    assert "ZIMAGE_COMPILE_CACHE" in server.log and "compile cache is off" in server.log
