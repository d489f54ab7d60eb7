"""The README's main job (scripts/run_workflow.py, which run_workflow.sh calls after setup) end to end."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.comfy_harness import ROOT, require_comfyui, session_dir


def test_main_job_without_weights_says_demo_and_saves_the_png():
    require_comfyui()
    work = session_dir("main-job")
    (work / "empty_models").mkdir()
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_workflow.py"), "--models-dir", str(work / "empty_models"),
         "--output-dir", str(work / "output"), "--width", "64", "--height", "48", "--cpu"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "RANDOM demo weights" in out.stdout and "noise" in out.stdout
    saved = re.findall(r"^Saved: (.+\.png)$", out.stdout, re.M)
    assert len(saved) == 1
    from PIL import Image

    assert Image.open(saved[0]).size == (64, 48)
    assert saved[0].startswith(str(work / "output"))
