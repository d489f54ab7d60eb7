"""The shipped workflows as ComfyUI's real frontend (1.32.9) sees them.

tests/frontend/frontend_api_prompts.json was recorded by dropping each workflow onto the canvas of the
frontend bundled with ComfyUI, in headless Chromium (tests/frontend/drop_workflows.js): every node
loaded, no schema alerts, and the frontend's own graphToPrompt() output. Our UI→API converter (used by
the main job and the tests) must produce exactly what the frontend queues.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.comfy_headless import ui_to_api
from tests.comfy_harness import WORKFLOWS, comfy_module

RECORDED = json.loads((Path(__file__).parent / "frontend" / "frontend_api_prompts.json").read_text())["workflows"]


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_converter_matches_the_frontends_own_conversion(name):
    workflow = json.loads((WORKFLOWS / name).read_text())
    frontend = RECORDED[name]
    known = comfy_module("nodes").NODE_CLASS_MAPPINGS
    missing = {n["type"] for n in workflow["nodes"]} - set(known) - {"MarkdownNote", "Note"}
    if missing:
        pytest.skip(f"{name} needs nodes this ComfyUI lacks ({', '.join(sorted(missing))}; recorded in frontend "
                    f"{frontend.get('frontend', '1.32.9')})")
    assert frontend["loaded_nodes"] == len(workflow["nodes"]), "the frontend dropped nodes on load"
    assert frontend["toasts"] == [], f"the frontend warned when loading {name}: {frontend['toasts']}"
    ours = ui_to_api(workflow, known)
    strip = {k: {"class_type": n["class_type"], "inputs": n["inputs"]} for k, n in ours.items()}
    assert strip == frontend["prompt"], (
        f"{name}: converter and frontend disagree (if the workflow was edited, re-record with "
        "tests/frontend/drop_workflows.js)")


def test_every_shipped_workflow_was_checked_in_the_frontend():
    assert sorted(RECORDED) == sorted(p.name for p in WORKFLOWS.glob("*.json"))
