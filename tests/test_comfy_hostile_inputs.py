"""What a web client can send a real ComfyUI server (main.py on 127.0.0.1): nothing it uploads or queues runs
code or slips past a widget's bounds.

One server for the module, started with ZIMAGE_COMPILE_CACHE pointing inside <user>/default (the folder
/userdata writes to), the setting that turned the compile cache into remote code execution.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.comfy_harness import DEMO_LORA
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


def _lora(**inputs) -> dict:
    return _t2i(**{"9": {"class_type": "ZImageLoraLoader",
                         "inputs": {"model": ["1", 0], "clip": ["2", 0], "lora_name": DEMO_LORA,
                                    "strength_model": 1.0, "strength_clip": 1.0, **inputs}},
                   "6": {"model": ["9", 0]}})


def _controlnet(**inputs) -> dict:
    return _t2i(**{"9": {"class_type": "ZImageControlNetLoader",
                         "inputs": {"control_net_name": DEMO_FILES["model_patches"]}},
                   "10": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1,
                                                                  "color": 0}},
                   "11": {"class_type": "ZImageControlNetApply",
                          "inputs": {"model": ["1", 0], "controlnet": ["9", 0], "vae": ["3", 0], "image": ["10", 0],
                                     "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0,
                                     "reference": "diffusers", **inputs}},
                   "6": {"model": ["11", 0]}})


def _core_lora(strength: float) -> dict:
    return _t2i(**{"9": {"class_type": "LoraLoaderModelOnly",
                         "inputs": {"model": ["1", 0], "lora_name": DEMO_LORA, "strength_model": strength}},
                   "6": {"model": ["9", 0]}})


OUT_OF_BOUNDS = [
    ("LoRA strength_model 1e30", "9", "strength_model", _lora(strength_model=1e30)),
    ("LoRA strength_model inf", "9", "strength_model", _lora(strength_model=math.inf)),
    ("LoRA strength_model -1e9", "9", "strength_model", _lora(strength_model=-1e9)),
    ("LoRA strength_clip -inf", "9", "strength_clip", _lora(strength_clip=-math.inf)),
    ("ControlNet start_percent -5", "11", "start_percent", _controlnet(start_percent=-5.0)),
    ("ControlNet end_percent 7", "11", "end_percent", _controlnet(end_percent=7.0)),
    ("ControlNet strength 1e30", "11", "strength", _controlnet(strength=1e30)),
    ("sampler guidance inf", "6", "guidance", _t2i(**{"6": {"guidance": math.inf}})),
    ("core LoraLoaderModelOnly strength 1e30 (the reference)", "9", "strength_model", _core_lora(1e30)),
]


@pytest.mark.parametrize("case", OUT_OF_BOUNDS, ids=[c[0] for c in OUT_OF_BOUNDS])
def test_widget_values_out_of_bounds_are_refused_when_queued(server, case):
    """HTTP 400 naming the node and input, as ComfyUI answers for its own nodes (the last case)."""
    _, node, name, prompt = case
    status, answer = _queue(server, prompt)
    assert status == 400, answer
    errors = answer["node_errors"][node]["errors"]
    assert any(e["type"] in ("value_bigger_than_max", "value_smaller_than_min") and e["details"] == name
               for e in errors), errors


NAN = [
    ("LoRA strength_model NaN", _lora(strength_model=math.nan), "ZImageLoraLoader: strength_model is nan"),
    ("LoRA strength_clip NaN", _lora(strength_clip=math.nan), "ZImageLoraLoader: strength_clip is nan"),
    ("ControlNet start_percent NaN", _controlnet(start_percent=math.nan),
     "ZImageControlNetApply: start_percent is nan"),
    ("ControlNet strength NaN", _controlnet(strength=math.nan), "ZImageControlNetApply: strength is nan"),
    ("ControlNet start after end", _controlnet(start_percent=0.8, end_percent=0.2),
     "start_percent (0.8) is after end_percent (0.2); swap them"),
    ("sampler guidance NaN", _t2i(**{"6": {"guidance": math.nan}}), "ZImageTurboSampler: guidance is nan"),
]


@pytest.mark.parametrize("case", NAN, ids=[c[0] for c in NAN])
def test_nan_widget_values_are_refused_with_a_clear_error(server, case):
    """ComfyUI lets NaN pass its min/max check (NaN < min is false, for core nodes too): our nodes refuse it
    when they run, naming the input and the range, before anything is computed with it."""
    _, prompt, message = case
    status, queued = _queue(server, prompt)
    assert status == 200, queued
    entry = _wait(server, queued["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    error = _error_of(entry)
    assert message in error and "set a number between" in error or "swap them" in error, error


def test_no_validate_inputs_switches_off_comfyuis_checks_of_a_float_widget():
    """ComfyUI skips its min/max checks for every input VALIDATE_INPUTS names, and for all of them when it takes
    **kwargs: no node of the pack does either for a FLOAT widget (INT ones it names, it checks itself)."""
    import inspect

    from tests.comfy_harness import comfy_module

    mappings = comfy_module("nodes").NODE_CLASS_MAPPINGS
    ours = {n: c for n, c in mappings.items() if n.startswith("ZImage")}
    assert len(ours) > 15
    for name, cls in ours.items():
        validate = getattr(cls, "VALIDATE_INPUTS", None)
        if validate is None:
            continue
        spec = inspect.getfullargspec(validate)
        assert spec.varkw is None, f"{name}.VALIDATE_INPUTS takes **{spec.varkw}"
        types = cls.INPUT_TYPES()
        floats = {k for section in types.values() for k, v in section.items() if v[0] == "FLOAT"}
        assert not floats & set(spec.args), f"{name}.VALIDATE_INPUTS names {floats & set(spec.args)}"
