"""Run ComfyUI workflows headless, in-process, in a real (unmodified) ComfyUI backend.

Used by the main job (scripts/run_workflow.py) and the tests. Two parts:

* `ui_to_api(workflow, node_classes)`: converts a UI-format workflow (what the frontend saves and
  what users drag in: nodes with widgets_values, a links array) to the API "prompt" format that
  ComfyUI's executor runs. Widget values map onto each node's INPUT_TYPES order, skipping the extra
  values the frontend stores for `control_after_generate` and image-upload widgets; links become
  `[node_id, slot]`; Note/MarkdownNote nodes are dropped and Reroutes are followed.
  `set_widget_value` goes the other way for one input, so a run's overrides can be written into the
  UI workflow that is embedded in the saved PNGs.
* `HeadlessComfyUI`: boots ComfyUI in this process (its own `nodes.init_extra_nodes`, with this
  pack loaded by ComfyUI's custom-node loader through an extra-model-paths file), then validates and
  executes prompts with `execution.validate_prompt` and `execution.PromptExecutor`. `close()` (also
  at exit) removes the temporary folder it made.

ComfyUI keeps global state (argument object, folder paths, loaded models), so there is one
HeadlessComfyUI per process.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-ZImage"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Bounds of what load_workflow reads: the shipped workflows are ~30 KB, nested ~8 levels, with 20-digit seeds.
MAX_WORKFLOW_BYTES = 64 * 2**20
MAX_DEPTH = 100
MAX_INT_DIGITS = 40
MAX_ID_DIGITS = 18


def default_comfyui_dir() -> Path:
    return Path(os.environ.get("ZIMAGE_COMFYUI_DIR") or ROOT / ".comfyui" / "ComfyUI")


class WorkflowError(ValueError):
    """A UI workflow that cannot be converted (unknown node type, broken link...)."""


# ----------------------------------------------------------------------------- UI → API conversion

def _widget_inputs(node_class: Any) -> list[tuple[str, dict]]:
    """The inputs the frontend shows as widgets, in INPUT_TYPES order, with their options."""
    spec = node_class.INPUT_TYPES()
    widgets = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind = entry[0]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            is_combo = isinstance(kind, (list, tuple))
            if (is_combo or kind in WIDGET_TYPES) and not options.get("forceInput"):
                widgets.append((name, options))
    return widgets


def _extra_widget_values(name: str, options: dict) -> set[str] | None:
    """Values the frontend stores after a widget for its companion widget, if it has one."""
    if options.get("control_after_generate") or name in ("seed", "noise_seed"):
        return CONTROL_VALUES
    if options.get("image_upload"):
        return {"image"}
    return None


def _widget_slots(node_class: Any, values: list) -> list[tuple[str, int]]:
    """(input name, index in widgets_values) for each widget value a UI node stores, in order."""
    slots, i = [], 0
    for name, options in _widget_inputs(node_class):
        if i >= len(values):
            break
        slots.append((name, i))
        i += 1
        extra = _extra_widget_values(name, options)
        if extra and i < len(values) and isinstance(values[i], str) and values[i] in extra:
            i += 1
    return slots


def set_widget_value(workflow: dict, node_id: int | str, name: str, value: Any,
                     node_classes: dict[str, Any]) -> None:
    """Set one widget input of a UI-format workflow's node (in place), where the frontend stores it."""
    node = next((n for n in workflow["nodes"] if str(n["id"]) == str(node_id)), None)
    if node is None:
        raise WorkflowError(f"the workflow has no node {node_id}")
    values = node.get("widgets_values")
    if isinstance(values, dict):
        values[name] = value
        return
    node_class = node_classes.get(node["type"])
    if node_class is None:
        raise WorkflowError(f"node {node_id} has type {node['type']!r}, which this ComfyUI does not know")
    for slot_name, index in _widget_slots(node_class, values or []):
        if slot_name == name:
            values[index] = value
            return
    raise WorkflowError(f"node {node_id} ({node['type']}) stores no widget value for {name!r}")


def _node_id(value: Any) -> int | None:
    """A UI node's id as the frontend writes it (a whole number, also as a string); None if it is not one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= MAX_ID_DIGITS:
        return int(value)
    return None


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def link_sources(workflow: dict) -> dict[int, list]:
    """{link id: [origin node id, output slot]} for each link a node input uses, Reroutes followed.

    WorkflowError for a link that is not in the links list, comes from a node that is not there, or runs
    through Reroutes in a circle (or through one without an input).
    """
    nodes = {_node_id(n["id"]): n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links") or []}

    def source(link_id: int, seen: tuple[int, ...] = ()) -> list:
        link = links.get(link_id)
        if link is None:
            raise WorkflowError(f"link {link_id} is missing from the workflow's links")
        from_node, from_slot = link[1], link[2]
        origin = nodes.get(from_node)
        if origin is None:
            raise WorkflowError(f"link {link_id} comes from node {from_node}, which is not in the workflow")
        if origin["type"] == "Reroute":
            if from_node in seen:
                raise WorkflowError(f"Reroute node {from_node} is fed by its own output (a loop of Reroutes)")
            upstream = next(iter(origin.get("inputs") or []), {}).get("link")
            if upstream is None:
                raise WorkflowError(f"Reroute node {from_node} has no input")
            return source(upstream, (*seen, from_node))
        return [str(from_node), from_slot]

    return {entry["link"]: source(entry["link"]) for node in workflow["nodes"]
            for entry in node.get("inputs") or [] if entry.get("link") is not None}


def ui_to_api(workflow: dict, node_classes: dict[str, Any]) -> dict[str, dict]:
    """Convert a UI-format workflow (as `load_workflow` accepts it) to an API prompt for ComfyUI's executor."""
    check_ui_workflow(workflow)
    sources = link_sources(workflow)
    nodes = {_node_id(n["id"]): n for n in workflow["nodes"]}
    prompt: dict[str, dict] = {}
    for node_id, node in sorted(nodes.items()):
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):  # 2 = muted, 4 = bypassed
            continue
        node_class = node_classes.get(kind)
        if node_class is None:
            raise WorkflowError(f"node {node_id} has type {kind!r}, which this ComfyUI does not know; "
                                "is the custom node pack that provides it installed?")
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            inputs.update({name: values[name] for name, _ in _widget_inputs(node_class) if name in values})
        else:
            inputs.update({name: values[i] for name, i in _widget_slots(node_class, values)})
        for entry in node.get("inputs") or []:
            if entry.get("link") is not None:
                inputs[entry["name"]] = sources[entry["link"]]
        api_node = {"class_type": kind, "inputs": inputs}
        if node.get("title"):
            api_node["_meta"] = {"title": node["title"]}
        prompt[str(node_id)] = api_node
    return prompt


def check_ui_workflow(workflow: Any) -> None:
    """WorkflowError (one line, naming the node or link) unless `workflow` has the UI format's shape:
    a "nodes" list of nodes with a whole-number id and a type, `inputs` a list of {name, link}, widget values
    a list or an object; a "links" list of [id, from node, from slot, to node, to slot, type]; every link a
    node uses is in that list and leads to a node (see `link_sources`)."""
    nodes = workflow.get("nodes") if isinstance(workflow, dict) else None
    if not isinstance(nodes, list) or not all(isinstance(n, dict) and "id" in n and "type" in n for n in nodes):
        raise WorkflowError("not a ComfyUI UI workflow (expected a JSON object with a \"nodes\" list of nodes "
                            "that have an id and a type)")
    seen: set[int] = set()
    for node in nodes:
        node_id = _node_id(node["id"])
        if node_id is None:
            raise WorkflowError(f"node id {_short(node['id'])} is not a whole number")
        if node_id in seen:
            raise WorkflowError(f"two nodes have the id {node_id}")
        seen.add(node_id)
        where = f"node {node_id}"
        if not isinstance(node["type"], str) or not node["type"]:
            raise WorkflowError(f"{where}: its type {_short(node['type'])} is not a node type name")
        if not _is_index(node.get("mode", 0)):
            raise WorkflowError(f"{where}: its mode {_short(node['mode'])} is not a whole number")
        inputs = node.get("inputs")
        if inputs is not None and not isinstance(inputs, list):
            raise WorkflowError(f"{where}: its inputs are {_short(inputs)}, not a list of inputs")
        for entry in inputs or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise WorkflowError(f"{where}: input {_short(entry)} has no name")
            if entry.get("link") is not None and not _is_index(entry["link"]):
                raise WorkflowError(f"{where}: input {entry['name']!r} names link {_short(entry['link'])}, "
                                    "not a link id")
        values = node.get("widgets_values")
        if values is not None and not isinstance(values, (list, dict)):
            raise WorkflowError(f"{where}: its widgets_values are {_short(values)}, not a list (or object) of "
                                "widget values")
        if node.get("title") is not None and not isinstance(node["title"], str):
            raise WorkflowError(f"{where}: its title {_short(node['title'])} is not text")
    links = workflow.get("links")
    if links is not None and not isinstance(links, list):
        raise WorkflowError(f"its links are {_short(links)}, not a list of links")
    for link in links or []:
        if not (isinstance(link, list) and len(link) >= 5 and all(_is_index(v) for v in link[:5])):
            raise WorkflowError(f"link {_short(link)} is not [id, from node, from slot, to node, to slot, type]")
    link_sources(workflow)


def _short(value: Any, limit: int = 60) -> str:
    """repr() of a value from a file, cut to a line's worth (a value may be megabytes long or deeply nested)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise WorkflowError(f"a number with {len(text.lstrip('-'))} digits (more than {MAX_INT_DIGITS}) is in it")
    return int(text)


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _read_file(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_WORKFLOW_BYTES; never blocks on a FIFO, never reads a
    device without end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO would wait for a writer
    except FileNotFoundError:
        raise WorkflowError(f"{path}: no such file") from None
    except OSError as e:
        raise WorkflowError(f"{path}: cannot be read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise WorkflowError(f"{path}: is a folder, not a workflow file")
        if not stat.S_ISREG(mode):
            raise WorkflowError(f"{path}: is not a regular file (a device, pipe or socket); save the workflow "
                                "to a .json file and pass that")
        try:
            data = f.read(MAX_WORKFLOW_BYTES + 1)
        except OSError as e:
            raise WorkflowError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(data) > MAX_WORKFLOW_BYTES:
        raise WorkflowError(f"{path}: is larger than {MAX_WORKFLOW_BYTES // 2**20} MiB, too large for a workflow")
    return data


def load_workflow(path: str | os.PathLike) -> dict:
    """Read a UI-format workflow file; WorkflowError (one line, naming the file) if it is not one."""
    path = Path(path)
    data = _read_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WorkflowError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        workflow = json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except WorkflowError as e:
        raise WorkflowError(f"{path}: {e}") from None
    except RecursionError:
        raise WorkflowError(f"{path}: nested deeper than a workflow is (more than {MAX_DEPTH} levels)") from None
    except ValueError as e:  # e.g. a number Python will not convert
        raise WorkflowError(f"{path}: not valid JSON ({e})") from None
    if _depth_exceeds(workflow, MAX_DEPTH):
        raise WorkflowError(f"{path}: nested deeper than a workflow is (more than {MAX_DEPTH} levels)")
    if isinstance(workflow, dict) and workflow and all(
            isinstance(n, dict) and "class_type" in n for n in workflow.values()):
        raise WorkflowError(f"{path}: this is an API-format prompt (Export (API)); a UI workflow is needed "
                            "(the file ComfyUI's Save / Export writes)")
    try:
        check_ui_workflow(workflow)
    except WorkflowError as e:
        raise WorkflowError(f"{path}: {e}") from None
    return workflow


# ----------------------------------------------------------------------------- in-process ComfyUI

class HeadlessServer:
    """What PromptExecutor needs from a server in a headless run: ComfyUI's own server interface
    (send_sync/queue_updated, client id, last node, socket metadata). Messages are recorded."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []
        self.listener: Callable[[str, Any], None] | None = None

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.messages.append((event, data))
        if self.listener is not None:
            self.listener(event, data)

    def queue_updated(self) -> None:
        pass


@dataclass
class RunResult:
    prompt_id: str
    ok: bool
    outputs: dict = field(default_factory=dict)  # node id → ui output (e.g. {"images": [...]})
    error: dict | None = None  # validation error or the execution_error message
    node_errors: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)

    @property
    def error_message(self) -> str:
        if not self.error:
            return ""
        parts = [str(self.error.get(k, "")) for k in ("message", "details", "exception_message")]
        for node_error in self.node_errors.values():
            for e in node_error.get("errors", []):
                parts += [str(e.get("message", "")), str(e.get("details", ""))]
        return " | ".join(p for p in parts if p)

    def images(self, output_dir: str | os.PathLike) -> list[Path]:
        paths = []
        for out in self.outputs.values():
            for image in out.get("images", []):
                if image.get("type") == "output":
                    paths.append(Path(output_dir) / image.get("subfolder", "") / image["filename"])
        return paths


def write_extra_paths_yaml(path: Path, models_dir: Path, custom_nodes_dir: Path) -> Path:
    """An extra_model_paths file: our models folder first (is_default) and a custom_nodes folder."""
    lines = ["zimage:", f"  base_path: {json.dumps(str(models_dir))}", "  is_default: true"]
    for folder in ("diffusion_models", "text_encoders", "vae", "checkpoints", "loras", "model_patches", "controlnet"):
        lines.append(f"  {folder}: {folder}")
    lines += ["zimage_nodes:", f"  custom_nodes: {json.dumps(str(custom_nodes_dir))}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def link_pack(custom_nodes_dir: Path) -> Path:
    """A custom_nodes folder holding a symlink to this checkout, as a user's git clone would be."""
    custom_nodes_dir.mkdir(parents=True, exist_ok=True)
    link = custom_nodes_dir / PACK_NAME
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    return custom_nodes_dir


class HeadlessComfyUI:
    """A real ComfyUI backend booted in this process (see module docstring)."""

    _started = False

    def __init__(self, models_dir: str | os.PathLike, work_dir: str | os.PathLike | None = None, *,
                 comfyui_dir: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None,
                 cpu: bool = True) -> None:
        self.comfyui_dir = Path(comfyui_dir) if comfyui_dir else default_comfyui_dir()
        if not (self.comfyui_dir / "execution.py").is_file():
            raise FileNotFoundError(f"no ComfyUI at {self.comfyui_dir}: run scripts/setup.sh (or set "
                                    "ZIMAGE_COMFYUI_DIR to a ComfyUI checkout)")
        self.models_dir = Path(models_dir)
        self._own_work_dir = not work_dir  # a temporary folder of ours: close() removes it
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="zimage-comfy-"))
        if self._own_work_dir:
            atexit.register(self.close)
        self.output_dir = Path(output_dir) if output_dir else self.work_dir / "output"
        self.input_dir = self.work_dir / "input"
        self.cpu = cpu
        self.server = HeadlessServer()
        self.executor = None

    def start(self) -> HeadlessComfyUI:
        if HeadlessComfyUI._started:
            raise RuntimeError("ComfyUI is already running in this process (one HeadlessComfyUI per process)")
        HeadlessComfyUI._started = True
        for d in (self.output_dir, self.input_dir, self.work_dir / "temp", self.work_dir / "user"):
            d.mkdir(parents=True, exist_ok=True)
        example = self.comfyui_dir / "input" / "example.png"  # what the img2img workflow loads
        if example.is_file() and not (self.input_dir / example.name).exists():
            shutil.copyfile(example, self.input_dir / example.name)
        # ComfyUI's top-level modules (nodes, execution, utils, ...) must win over same-named folders
        # elsewhere on sys.path, e.g. this pack's own `nodes/` package.
        sys.path.insert(0, str(self.comfyui_dir))
        for name in ("nodes", "utils"):
            mod = sys.modules.get(name)
            if mod is not None and not str(getattr(mod, "__file__", "")).startswith(str(self.comfyui_dir)):
                del sys.modules[name]
        from comfy.cli_args import args  # parses no command line unless ComfyUI's main enabled it

        args.cpu = self.cpu
        args.disable_auto_launch = True
        args.preview_method = args.preview_method  # keep ComfyUI's default (auto → latent2rgb)
        import folder_paths

        folder_paths.set_output_directory(str(self.output_dir))
        folder_paths.set_input_directory(str(self.input_dir))
        folder_paths.set_temp_directory(str(self.work_dir / "temp"))
        folder_paths.set_user_directory(str(self.work_dir / "user"))
        custom_nodes = link_pack(self.work_dir / "custom_nodes")
        yaml_path = write_extra_paths_yaml(self.work_dir / "extra_model_paths.yaml", self.models_dir, custom_nodes)
        import utils.extra_config

        utils.extra_config.load_extra_path_config(str(yaml_path))
        import execution
        import nodes
        import server

        # As ComfyUI's main.py: its PromptServer exists (never started here) before the nodes load; newer
        # ComfyUI's built-in nodes register with `PromptServer.instance` at load (0.18.1: node
        # replacements). Prompts still run through HeadlessServer below.
        self.loop = asyncio.new_event_loop()
        self.prompt_server = server.PromptServer(self.loop)
        self.failed_imports = self.loop.run_until_complete(
            nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        # "ram_inactive": 0.28's RAM-pressure cache reads it in every execute (unused by the classic cache).
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        return self

    @property
    def node_classes(self) -> dict[str, Any]:
        import nodes

        return nodes.NODE_CLASS_MAPPINGS

    def to_api(self, workflow: dict) -> dict[str, dict]:
        return ui_to_api(workflow, self.node_classes)

    def close(self) -> None:
        """Remove the temporary work folder this instance made (not one it was given). Safe to repeat."""
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def run(self, prompt: dict[str, dict], *, workflow: dict | None = None,
            listener: Callable[[str, Any], None] | None = None) -> RunResult:
        """Validate and execute one API prompt, like ComfyUI's queue worker does.

        `workflow`: the UI workflow the prompt came from; sent as the frontend does when queueing
        (extra_data's extra_pnginfo), so SaveImage embeds it in the PNGs and dropping one onto ComfyUI
        restores the graph. `listener(event, data)`: called with the messages the server would send a
        connected frontend ("executing", "progress_state", ...).
        """
        import execution

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            return RunResult(prompt_id, False, error=valid[1], node_errors=valid[3])
        self.server.messages.clear()
        self.server.last_prompt_id = prompt_id
        # Node-by-node messages go only to a client, as in ComfyUI's server; a listener is one.
        extra_data: dict[str, Any] = {"client_id": "headless" if listener else None}
        if workflow is not None:
            extra_data["extra_pnginfo"] = {"workflow": workflow}
        self.server.listener = listener
        try:
            self.executor.execute(prompt, prompt_id, extra_data, valid[2])
        finally:
            self.server.listener = None
        messages = list(self.executor.status_messages)
        error = next((data for event, data in messages if event in ("execution_error", "execution_interrupted")),
                     None)
        outputs = self.executor.history_result.get("outputs", {}) if self.executor.success else {}
        return RunResult(prompt_id, self.executor.success and error is None, outputs, error, {}, messages)
