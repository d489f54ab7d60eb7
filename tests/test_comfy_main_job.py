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

from scripts.comfy_headless import ui_to_api
from tests.comfy_harness import (
    LORA_CORE,
    ROOT,
    T2I,
    comfy_module,
    require_comfyui,
    session_dir,
)
from zimage_core.demo_weights import DEMO_FILES

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


def _interrupt_from_another_thread(pid: int) -> None:
    """SIGINT delivered to a worker thread of the process (a terminal's Ctrl-C may go to any thread that does
    not block it): the main thread stays inside its write, which completes once the pipe is drained, and
    Python runs the handler at its next check, still inside the buffered write."""
    import ctypes

    others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert others, "the job has no worker thread"
    libc = ctypes.CDLL(None, use_errno=True)
    tgkill = {"x86_64": 234, "aarch64": 131}[platform.machine()]
    assert libc.syscall(tgkill, pid, others[0], signal.SIGINT) == 0, os.strerror(ctypes.get_errno())


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
    # KSampler (the LoRA workflow) takes 1000 steps: the run is still sampling when the pipe is full.
    proc = subprocess.Popen(job.command("--models-dir", str(job.work / "empty_models"), "--workflow", str(LORA_CORE),
                                        "--width", "32", "--height", "32", "--steps", "1000", "--cpu"),
                            stdout=subprocess.PIPE, stderr=write_end, env=job.env, cwd=job.work)
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
        _interrupt_from_another_thread(proc.pid)
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
