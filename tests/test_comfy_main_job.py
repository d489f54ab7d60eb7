"""The README's main job (scripts/run_workflow.py, which run_workflow.sh calls after setup) end to end.

Every run is a separate process with TMPDIR pointed at a fresh folder, as a user runs it; ComfyUI is the
real one from setup. Runs that boot ComfyUI take ~15 s on a small CPU, so one demo run is shared by the
tests that only read its output.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scripts.comfy_headless import default_comfyui_dir, ui_to_api
from tests.comfy_harness import (
    ENHANCED_PROMPT,
    LORA_CORE,
    ROOT,
    T2I,
    TWO_LORAS,
    WORKFLOWS,
    comfy_module,
    demo_models,
    require_comfyui,
    session_dir,
)
from zimage_core.demo_weights import DEMO_FILES, DEMO_GGUF_FILES

MAIN = ROOT / "scripts" / "run_workflow.py"
# 51 steps: more than 50, where the step lines once thinned out to every tenth.
STEPS = 51
SETTINGS = ["--width", "64", "--height", "48", "--seed", "7", "--steps", str(STEPS), "--prompt",
            "a lighthouse at dusk", "--cpu"]
BASE_NAMES = {"diffusion_models": "z_image_turbo_bf16.safetensors", "text_encoders": "qwen_3_4b.safetensors",
              "vae": "ae.safetensors"}


class Job:
    """One main-job process: its own work folder, TMPDIR and output folder."""

    def __init__(self, name: str) -> None:
        self.work = session_dir(f"main-job-{name}")
        self.tmp = self.work / "tmp"
        self.output = self.work / "output"
        self.tmp.mkdir()

    def command(self, *args: str) -> list[str]:
        return [sys.executable, str(MAIN), "--output-dir", str(self.output), *args]

    @property
    def env(self) -> dict:
        return {**os.environ, "TMPDIR": str(self.tmp)}

    def run(self, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout,
                              env=self.env, cwd=self.work)

    def leftovers(self) -> list[str]:
        """What the run left in the temp folder; torch's per-user compile cache folder is torch's own."""
        return sorted(p.name for p in self.tmp.iterdir() if not p.name.startswith("torchinductor_"))


def saved_paths(stdout: str) -> list[str]:
    return re.findall(r"^Saved: (.+\.png)$", stdout, re.M)


@pytest.fixture(scope="module")
def demo_run():
    """The main job with no model files: demo weights, small size, the run's own settings."""
    require_comfyui()
    job = Job("demo")
    (job.work / "empty_models").mkdir()
    out = job.run("--models-dir", str(job.work / "empty_models"), *SETTINGS)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return job, out


def test_main_job_without_weights_says_demo_and_saves_the_png(demo_run):
    job, out = demo_run
    assert "RANDOM demo weights" in out.stdout and "noise" in out.stdout
    assert "none of the model files is in" in out.stdout
    saved = saved_paths(out.stdout)
    assert len(saved) == 1
    from PIL import Image

    assert Image.open(saved[0]).size == (64, 48)
    assert saved[0].startswith(str(job.output))


def test_main_job_reports_each_node_and_sampling_step_on_stderr(demo_run):
    _, out = demo_run
    lines = out.stderr.splitlines()
    sampler = lines.index("  node 6: ZImageTurboSampler")
    steps = [line.strip() for line in lines[sampler + 1:sampler + 1 + STEPS]]
    assert steps == [f"step {i}/{STEPS}" for i in range(1, STEPS + 1)]
    assert "  node 7: ZImageVAEDecode" in lines[sampler + 1 + STEPS:]
    assert "step" not in out.stdout, "progress goes to stderr; stdout keeps the result lines"


def test_saved_png_carries_the_workflow_that_ran(demo_run):
    """Dropping the PNG onto ComfyUI restores the graph: SaveImage embeds the UI workflow (with this run's
    settings) and the API prompt, as when the frontend queues it."""
    from PIL import Image

    (png,) = saved_paths(demo_run[1].stdout)
    chunks = Image.open(png).text
    embedded = json.loads(chunks["workflow"])
    shipped = json.loads(T2I.read_text())
    assert [(n["id"], n["type"]) for n in embedded["nodes"]] == [(n["id"], n["type"]) for n in shipped["nodes"]]
    assert embedded["links"] == shipped["links"]
    widgets = {n["type"]: n["widgets_values"] for n in embedded["nodes"]}
    assert widgets["ZImageTextEncode"] == ["a lighthouse at dusk"]
    assert widgets["ZImageEmptyLatent"][:3] == [64, 48, "custom"]
    assert widgets["ZImageTurboSampler"][:3] == [7, "fixed", STEPS]
    assert widgets["ZImageVAELoader"] == [DEMO_FILES["vae"]]
    # Queuing the restored graph gives exactly the prompt that ran (also embedded, as ComfyUI does).
    ran = json.loads(chunks["prompt"])
    for node in ran.values():
        node.pop("is_changed", None)  # ComfyUI's executor adds the loaders' IS_CHANGED stamps before saving
    assert ui_to_api(embedded, comfy_module("nodes").NODE_CLASS_MAPPINGS) == ran
    assert ran["6"]["inputs"]["seed"] == 7 and ran["6"]["inputs"]["steps"] == STEPS


def test_main_job_leaves_nothing_in_the_temp_folder(demo_run):
    job, _ = demo_run
    assert job.leftovers() == []


def test_real_files_by_name_path_and_the_fp8_text_encoder(demo_run):
    """No demo weights once the files are there: --model by name, --vae by path, and the fp8 text encoder
    standing in for qwen_3_4b.safetensors. (The files hold the demo weights, so the picture must equal the
    demo run's: the chosen files are what was loaded.)"""
    job = Job("files")
    models, demo = job.work / "models", ROOT / "demo_models"
    for folder, name in (("diffusion_models", "z_image_turbo_bf16.safetensors"),
                         ("text_encoders", "qwen_3_4b_fp8_mixed.safetensors")):
        (models / folder).mkdir(parents=True)
        shutil.copyfile(demo / folder / DEMO_FILES[folder], models / folder / name)
    vae = job.work / "downloads" / "my_ae.safetensors"
    vae.parent.mkdir()
    shutil.copyfile(demo / "vae" / DEMO_FILES["vae"], vae)

    out = job.run("--models-dir", str(models), "--model", "z_image_turbo_bf16.safetensors", "--vae", str(vae),
                  *SETTINGS)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "demo" not in out.stdout.lower()
    assert f"using {models / 'text_encoders' / 'qwen_3_4b_fp8_mixed.safetensors'}" in out.stdout
    from PIL import Image

    (png,) = saved_paths(out.stdout)
    loaders = {n["type"]: n["widgets_values"][0] for n in json.loads(Image.open(png).text["workflow"])["nodes"]
               if n["type"].endswith("Loader")}
    assert loaders == {"ZImageModelLoader": "z_image_turbo_bf16.safetensors",
                       "ZImageTextEncoderLoader": "qwen_3_4b_fp8_mixed.safetensors",
                       "ZImageVAELoader": "my_ae.safetensors"}
    (demo_png,) = saved_paths(demo_run[1].stdout)
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(demo_png)))
    assert job.leftovers() == []
    assert vae.is_file(), "the staged link is removed, never the user's file"


def test_some_model_files_missing_is_an_error_naming_them_and_where():
    require_comfyui()
    job = Job("partial")
    models = job.work / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "diffusion_models" / "z_image_turbo_bf16.safetensors").write_bytes(b"not loaded")
    out = job.run("--models-dir", str(models), "--width", "64", "--height", "48")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "RANDOM" not in out.stdout and not saved_paths(out.stdout)
    assert "2 of the 3 model files the workflow needs are missing" in out.stderr
    for path in ("text_encoders/qwen_3_4b.safetensors", "text_encoders/qwen_3_4b_fp8_mixed.safetensors",
                 "vae/ae.safetensors"):
        assert f"      {models / path}\n" in out.stderr
    assert f"diffusion model: found {models / 'diffusion_models' / 'z_image_turbo_bf16.safetensors'}" in out.stderr
    assert job.leftovers() == []


WRITE_SYSCALL = {"x86_64": "1", "aarch64": "64"}.get(platform.machine())


def _blocked_writing_stderr(pid: int, timeout: float = 300) -> bool:
    """Whether the process sleeps in write(2, ...) (within `timeout` seconds), from /proc/<pid>/syscall."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fields = Path(f"/proc/{pid}/syscall").read_text().split()
        except OSError:
            return False
        if fields[:2] == [WRITE_SYSCALL, "0x2"]:
            return True
        time.sleep(0.02)
    return False


def _interrupt_main_thread(pid: int) -> None:
    """SIGINT to the main thread itself while it sleeps in write(2), as a terminal's Ctrl-C reaches it: the write
    fails with EINTR and Python runs the handler right there, inside BufferedWriter's flush with the stream's
    lock held (where a handler that prints to sys.stderr dies with "reentrant call inside")."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    tgkill = {"x86_64": 234, "aarch64": 131}[platform.machine()]
    assert libc.syscall(tgkill, pid, pid, signal.SIGINT) == 0, os.strerror(ctypes.get_errno())


@pytest.mark.skipif(WRITE_SYSCALL is None, reason="write's syscall number is known for x86_64 and aarch64")
def test_ctrl_c_cancels_the_run_and_cleans_up():
    """Ctrl-C while the main thread is inside a write to stderr: the job's stderr is a pipe the test fills, so
    the job blocks in the write of a step line and the signal handler runs inside that write. Python then
    refuses any write through sys.stderr ("RuntimeError: reentrant call inside <_io.BufferedWriter
    name='<stderr>'>"); the run must still be cancelled cleanly, without a traceback."""
    require_comfyui()
    job = Job("ctrl-c")
    (job.work / "empty_models").mkdir()
    read_end, write_end = os.pipe()
    # A newcomer's Python buffers stderr (a BufferedWriter, whose lock the handler meets); PYTHONUNBUFFERED, set
    # on some machines, would make it a raw FileIO with no lock to run into.
    env = {k: v for k, v in job.env.items() if k != "PYTHONUNBUFFERED"}
    # KSampler (the LoRA workflow) takes 1000 steps: the run is still sampling when the pipe is full.
    proc = subprocess.Popen(job.command("--models-dir", str(job.work / "empty_models"), "--workflow", str(LORA_CORE),
                                        "--width", "32", "--height", "32", "--steps", "1000", "--cpu"),
                            stdout=subprocess.PIPE, stderr=write_end, env=env, cwd=job.work)
    # A second, non-blocking open of the pipe's write end (O_NONBLOCK on `write_end` itself would also make the
    # job's writes non-blocking: the two share one open file description).
    filler = os.open(f"/proc/self/fd/{write_end}", os.O_WRONLY | os.O_NONBLOCK)
    os.close(write_end)
    stderr = os.fdopen(read_end, "rb")
    try:
        seen = []
        for line in stderr:
            seen.append(line)
            if line.strip() == b"step 1/1000":
                break
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(filler, b"\n" * 512)
        os.close(filler)
        assert _blocked_writing_stderr(proc.pid), "the job never blocked writing to stderr"
        _interrupt_main_thread(proc.pid)
        err = (b"".join(seen) + stderr.read()).decode().replace("\n\n", "\n")
        out = proc.stdout.read().decode()
        assert proc.wait(timeout=60) == 130, out + err[-3000:]
    finally:
        stderr.close()
        if proc.poll() is None:
            proc.kill()
    assert "Cancelling (Ctrl-C again to stop at once)" in err and "Interrupted." in err
    assert "Traceback" not in err and "reentrant" not in err, err[-3000:]
    assert "step 1000/1000" not in err and not saved_paths(out)
    assert job.leftovers() == []


@pytest.mark.parametrize("args, message", [
    (["--width", "0"], "argument --width: 0 is too small (at least 16)"),
    (["--height", "-16"], "argument --height: -16 is too small (at least 16)"),
    (["--width", "100"], "argument --width: 100 is not a multiple of 16"),
    (["--steps", "0"], "argument --steps: 0 is too small (at least 1)"),
    (["--seed", "-1"], "argument --seed: -1 is too small (at least 0)"),
    (["--steps", "many"], "argument --steps: 'many' is not a whole number"),
    (["--width", "4112"], "argument --width: 4112 is too large (at most 4096)"),
    (["--height", "100000"], "argument --height: 100000 is too large (at most 4096)"),
])
def test_bad_numbers_are_rejected_by_the_command_line(args, message):
    job = Job("args")
    out = job.run(*args, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"run_workflow.py: error: {message}")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ('{"nodes": [', "not valid JSON (Expecting value at line 1, column 12)"),
    ('{"3": {"class_type": "KSampler", "inputs": {}}}', "this is an API-format prompt"),
    ('{"nodes": "x"}', "not a ComfyUI UI workflow"),
    ("[1, 2]", "not a ComfyUI UI workflow"),
    ("[" * 100_000 + "]" * 100_000, "nested deeper than a workflow is"),
    ('{"nodes": [], "extra": ' + "[" * 500 + "]" * 500 + "}", "nested deeper than a workflow is"),
    ('{"nodes": [{"id": 1, "type": "Note", "widgets_values": [' + "7" * 5000 + "]}]}",
     "a number with 5000 digits"),
    ('{"nodes": [{"id": "abc", "type": "ZImageEmptyLatent"}]}', "node id 'abc' is not a whole number"),
    (json.dumps({"nodes": [{"id": 1, "type": "A"}, {"id": 2, "type": "B", "inputs": [{"name": "x", "link": 5}]}],
                 "links": [[5, 1]]}), "link [5, 1] is not [id, from node, from slot, to node, to slot, type]"),
    (json.dumps({"nodes": [{"id": 3, "type": "Reroute", "inputs": [{"name": "", "link": 9}]},
                           {"id": 4, "type": "SaveImage", "inputs": [{"name": "images", "link": 9}]}],
                 "links": [[9, 3, 0, 3, 0, "*"]]}), "Reroute node 3 is fed by its own output"),
    ('{"nodes": [{"id": 1, "type": "SaveImage", "inputs": "images"}]}',
     "node 1: its inputs are 'images', not a list of inputs"),
    ('{"nodes": [{"id": 1, "type": "ZImageEmptyLatent", "widgets_values": 1024}]}',
     "node 1: its widgets_values are 1024, not a list"),
])
def test_a_bad_workflow_file_is_one_clear_line(content, message):
    job = Job("workflow")
    path = job.work / "my_workflow.json"
    if content is not None:
        path.write_text(content)
    start = time.monotonic()
    out = job.run("--workflow", str(path), timeout=60)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"run_workflow.py: error: --workflow {path}: ") and message in line
    assert time.monotonic() - start < 30, "a bad file is reported before ComfyUI starts"
    assert job.leftovers() == []


def test_headless_comfyui_removes_its_temporary_folder(tmp_path):
    """HeadlessComfyUI without a work folder makes a temporary one, removed by close() or at exit."""
    require_comfyui()
    from scripts.comfy_headless import HeadlessComfyUI

    headless = HeadlessComfyUI(tmp_path)
    assert headless.work_dir.is_dir() and headless.work_dir.name.startswith("zimage-comfy-")
    headless.close()
    assert not headless.work_dir.exists()

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from scripts.comfy_headless import HeadlessComfyUI; "
            "print(HeadlessComfyUI(sys.argv[2]).work_dir)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "TMPDIR": str(tmp)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == tmp
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_workflow_that_is_not_a_regular_file_is_refused_at_once(kind):
    """/dev/zero would be read until memory runs out, a FIFO would wait for a writer forever."""
    job = Job("workflow-special")
    path = Path("/dev/zero") if kind == "device" else job.work / "pipe.json"
    if kind == "fifo":
        os.mkfifo(path)
    out = job.run("--workflow", str(path), timeout=60)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line == (f"run_workflow.py: error: --workflow {path}: is not a regular file (a device, pipe or socket); "
                    "save the workflow to a .json file and pass that")


def test_folders_that_cannot_be_used_are_argument_errors():
    job = Job("folders")
    a_file = job.work / "a_file"
    a_file.write_text("x")
    out = job.run("--models-dir", str(job.work / "no_such_models"), timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (f"run_workflow.py: error: --models-dir {job.work / 'no_such_models'}: no such folder "
                                  "(give ComfyUI's models folder, the one holding diffusion_models/, vae/, ...)")
    out = job.run("--models-dir", str(a_file), timeout=60)
    assert out.returncode == 2 and f"--models-dir {a_file}: is not a folder" in out.stderr
    out = subprocess.run([sys.executable, str(MAIN), "--output-dir", str(a_file / "pngs")], capture_output=True,
                         text=True, timeout=60, env=job.env, cwd=job.work)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"run_workflow.py: error: --output-dir {a_file / 'pngs'}: {a_file} is a file, not a folder"
    assert job.leftovers() == []


def test_help_and_argument_errors_answer_before_any_setup(tmp_path):
    """run_workflow.sh checks its arguments (the standard library only) before scripts/setup.sh runs: on a
    machine where setup cannot run (here: a setup.sh that only records that it ran and fails), --help and
    argument errors still answer."""
    clone = tmp_path / "clone"
    for rel in ("scripts/run_workflow.sh", "scripts/run_workflow.py", "scripts/comfy_headless.py",
                "scripts/__init__.py", "zimage_core/__init__.py", "zimage_core/constants.py", T2I.relative_to(ROOT)):
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, clone / rel)
    marker = tmp_path / "setup-ran"
    setup = clone / "scripts" / "setup.sh"
    setup.write_text(f"#!/bin/sh\ntouch {marker}\nexit 100\n")
    setup.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("ZIMAGE_VENV", "PYTHON")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(clone / "scripts" / "run_workflow.sh"), *args], capture_output=True, text=True,
                              timeout=60, env=env, cwd=tmp_path)

    out = run("--help")
    assert out.returncode == 0 and "usage: run_workflow.py" in out.stdout and not marker.exists()
    assert "width and height 16 to 4096 pixels" in out.stdout and "16 to 4096, a multiple of 16" in out.stdout
    out = run("--width", "5000")
    assert out.returncode == 2 and not marker.exists()
    assert out.stderr.strip().splitlines()[-1] == "run_workflow.py: error: argument --width: 5000 is too large (at most 4096)"
    out = run("--workflow", str(tmp_path / "nope.json"))
    assert out.returncode == 2 and "no such file" in out.stderr and not marker.exists()
    out = run("--seed", "1")  # good arguments: setup comes next (and fails here, with its own code)
    assert out.returncode == 100 and marker.exists()


def _workflow_copy(job: Job, source: Path, change) -> Path:
    workflow = json.loads(source.read_text())
    change({n["type"]: n for n in workflow["nodes"]})
    path = job.work / f"my_{source.name}"
    path.write_text(json.dumps(workflow))
    return path


def test_a_size_error_in_the_workflow_is_reported_once_naming_its_input():
    """ComfyUI repeats a node's own validation message under each input it validates ("width - height ...",
    "preset - height ..."): the job reports it once, as the node says it."""
    require_comfyui()
    job = Job("size")
    (job.work / "empty_models").mkdir()
    workflow = _workflow_copy(job, T2I, lambda nodes: nodes["ZImageEmptyLatent"].update(
        widgets_values=[1024, 100000, "custom", 1]))
    out = job.run("--workflow", str(workflow), "--models-dir", str(job.work / "empty_models"), "--cpu")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "100000" in line]
    assert errors == ["ERROR: the workflow failed: node 5 (ZImageEmptyLatent): height 100000 is outside 16..4096 "
                      "pixels"], out.stderr[-3000:]
    assert job.leftovers() == []


def test_a_failing_node_is_one_line_without_a_traceback():
    """A node's clear error (here the text encoder's, for an empty prompt) is the whole report: ComfyUI's
    "!!! Exception during processing !!!" and traceback are not printed in front of it."""
    require_comfyui()
    job = Job("node-error")
    (job.work / "empty_models").mkdir()
    out = job.run("--models-dir", str(job.work / "empty_models"), "--prompt", " ", "--width", "32", "--height", "32",
                  "--steps", "1", "--cpu")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "!!!" not in out.stderr, out.stderr[-3000:]
    (line,) = [line for line in out.stderr.splitlines() if "ERROR" in line]
    assert line.startswith("ERROR: the workflow failed: node 4 (ZImageTextEncode): ZImageTextEncode: the prompt is "
                           "empty.")


def test_prompt_sets_the_idea_of_the_prompt_enhancer_and_the_enhanced_prompt_is_printed():
    require_comfyui()
    job = Job("enhancer")
    (job.work / "empty_models").mkdir()
    # The shipped workflow with the answer capped at 16 tokens (random demo weights never stop on their own).
    workflow = _workflow_copy(job, ENHANCED_PROMPT, lambda nodes: nodes["ZImagePromptEnhancer"]["widgets_values"]
                              .__setitem__(4, 16))
    out = job.run("--workflow", str(workflow), "--models-dir", str(job.work / "empty_models"), "--prompt",
                  "a red bicycle", "--width", "32", "--height", "32", "--steps", "1", "--cpu")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    from PIL import Image

    (png,) = saved_paths(out.stdout)
    ran = json.loads(Image.open(png).text["prompt"])
    assert ran["10"]["class_type"] == "ZImagePromptEnhancer" and ran["10"]["inputs"]["text"] == "a red bicycle"
    assert ran["4"]["inputs"]["text"] == ["10", 0], "the encoded text is still the enhancer's output"
    (enhanced,) = [line for line in out.stdout.splitlines() if line.startswith("Enhanced prompt (node 10): ")]
    assert len(enhanced) > len("Enhanced prompt (node 10): ")
    lines = out.stderr.splitlines()
    enhancer = lines.index("  node 10: ZImagePromptEnhancer")
    assert [line.strip() for line in lines[enhancer + 1:enhancer + 17]] == [f"step {i}/16" for i in range(1, 17)]


SHIPPED = sorted(WORKFLOWS.glob("*.json"))
# Run in demo mode elsewhere in this module: text to image (demo_run) and the prompt enhancer (capped answer).
ELSEWHERE = {T2I.name, ENHANCED_PROMPT.name}


def demo_picture(path: Path) -> Path:
    """A small RGBA picture with a transparent square (the inpainting workflows' mask)."""
    from PIL import Image

    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = np.arange(64) * 4, np.arange(48)[:, None] * 5, 255
    rgba[12:36, 16:48, 3] = 0
    Image.fromarray(rgba, "RGBA").save(path)
    return path


@pytest.mark.parametrize("workflow", [w for w in SHIPPED if w.name not in ELSEWHERE], ids=lambda w: w.stem)
def test_demo_mode_runs_every_shipped_workflow(workflow):
    """With no model file at all, every shipped workflow runs on demo files: ControlNet and LoRA included."""
    require_comfyui()
    assert len(SHIPPED) >= 9
    job = Job("demo-" + workflow.stem)
    (job.work / "empty_models").mkdir()
    kinds = {n["type"] for n in json.loads(workflow.read_text())["nodes"]}
    size = ["--width", "32", "--height", "32"] if "ZImageEmptyLatent" in kinds else []
    image = ["--image", str(demo_picture(job.work / "picture.png"))] if "LoadImage" in kinds else []
    out = job.run("--workflow", str(workflow), "--models-dir", str(job.work / "empty_models"), *size, *image,
                  "--steps", "2", "--cpu")
    if "TextEncodeZImageOmni" in kinds and not (default_comfyui_dir() / "comfy_extras" / "nodes_zimage.py").is_file():
        # ComfyUI's Omni text encode came after 0.3.75: one clear line naming the node, no traceback.
        assert out.returncode == 2 and "'TextEncodeZImageOmni', which this ComfyUI does not know" in out.stderr
        assert "Traceback" not in out.stderr
        return
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "RANDOM demo weights" in out.stdout and len(saved_paths(out.stdout)) >= 1
    from PIL import Image

    embedded = json.loads(Image.open(saved_paths(out.stdout)[0]).text["prompt"])
    files = {n["class_type"]: v for n in embedded.values()
             for k, v in n["inputs"].items() if k in ("control_net_name", "lora_name")}
    if "ZImageControlNetLoader" in kinds:
        assert files["ZImageControlNetLoader"] == DEMO_FILES["model_patches"]
        assert "your_z_image_lora" not in out.stdout
    for loader in ("ZImageLoraLoader", "LoraLoaderModelOnly"):
        if loader in kinds:
            assert files[loader] == DEMO_FILES["loras"]
    named = {n["inputs"][k] for n in embedded.values() for k in ("model_name", "text_encoder_name")
             if k in n["inputs"]}
    if any(str(v).endswith(".gguf") for n in json.loads(workflow.read_text())["nodes"]
           for v in n.get("widgets_values") or []):  # a GGUF workflow runs on the demo models as GGUF files
        assert named == set(DEMO_GGUF_FILES.values()), named
    assert job.leftovers() == []


def _base_models(job: Job) -> Path:
    """A models folder with the three base files under their real names (demo weights inside)."""
    models = job.work / "models"
    for folder, name in BASE_NAMES.items():
        (models / folder).mkdir(parents=True)
        shutil.copyfile(demo_models() / folder / DEMO_FILES[folder], models / folder / name)
    return models


def test_a_missing_controlnet_gets_the_missing_file_report():
    require_comfyui()
    job = Job("no-controlnet")
    models = _base_models(job)
    out = job.run("--workflow", str(WORKFLOWS / "z_image_turbo_controlnet_canny.json"), "--models-dir", str(models),
                  "--cpu")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "Value not in list" not in out.stderr and "SaveImage" not in out.stderr
    assert "1 of the 4 model files the workflow needs is missing:" in out.stderr
    name = "Z-Image-Turbo-Fun-Controlnet-Union-2.1-2601-8steps.safetensors"
    assert f"  ControlNet: {name}, looked for at:\n      {models / 'model_patches' / name}\n" \
           f"      {models / 'controlnet' / name}\n" in out.stderr
    assert "download: https://huggingface.co/alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1" in out.stderr
    assert f"vae: found {models / 'vae' / 'ae.safetensors'}".lower() in out.stderr.lower()


def test_controlnet_and_lora_options_pick_files_and_a_missing_lora_is_reported():
    """--controlnet takes a path; --lora fills the LoRA loaders in node order, and a LoRA loader left with a
    missing file gets the missing-file report (folder, where to get one)."""
    require_comfyui()
    job = Job("options")
    models = _base_models(job)
    controlnet = job.work / "downloads" / "my_controlnet.safetensors"
    controlnet.parent.mkdir()
    shutil.copyfile(demo_models() / "model_patches" / DEMO_FILES["model_patches"], controlnet)
    out = job.run("--workflow", str(WORKFLOWS / "z_image_turbo_controlnet_canny.json"), "--models-dir", str(models),
                  "--controlnet", str(controlnet), "--image", str(demo_picture(job.work / "picture.png")),
                  "--width", "32", "--height", "32", "--steps", "1", "--cpu")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "demo" not in out.stdout.lower()
    from PIL import Image

    ran = json.loads(Image.open(saved_paths(out.stdout)[0]).text["prompt"])
    assert ran["7"]["inputs"]["control_net_name"] == "my_controlnet.safetensors"

    lora = job.work / "downloads" / "my_lora.safetensors"
    shutil.copyfile(demo_models() / "loras" / DEMO_FILES["loras"], lora)
    out = job.run("--workflow", str(TWO_LORAS), "--models-dir", str(models), "--lora", str(lora), "--cpu")
    assert out.returncode == 1 and "Traceback" not in out.stderr and "Value not in list" not in out.stderr
    assert "1 of the 5 model files the workflow needs is missing:" in out.stderr
    assert f"  LoRA: z_image_detail_lora.safetensors, looked for at:\n      {models / 'loras'}/" in out.stderr
    assert f"LoRA: found {lora}" in out.stderr
    assert "z_image_style_lora" not in out.stderr, "--lora replaced the first LoRA loader's file"
    out = job.run("--workflow", str(TWO_LORAS), "--models-dir", str(models), "--lora", str(lora), "--lora", "a",
                  "--lora", "b", "--cpu")
    assert out.returncode == 2
    assert "--lora is given 3 times, but z_image_turbo_two_loras.json has 2 ZImageLoraLoader" in out.stderr
    assert job.leftovers() == []
