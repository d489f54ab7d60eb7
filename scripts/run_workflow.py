"""Main job: run a shipped workflow (default: text-to-image) headless in a real ComfyUI; print the PNG path.

    ./scripts/run_workflow.sh                      # setup (idempotent) + this script
    ./scripts/run_workflow.sh --models-dir ~/ComfyUI/models --prompt "a lighthouse at dusk"
    ./scripts/run_workflow.sh --model ~/Downloads/z_image_turbo_bf16.safetensors --text-encoder ... --vae ...
    ./scripts/run_workflow.sh --workflow workflows/z_image_turbo_controlnet_canny.json --controlnet FILE

The workflow file is executed as users run it: converted from the UI format to ComfyUI's API format and
queued into ComfyUI's own executor, with this pack loaded by ComfyUI's custom-node loader. The saved
PNGs carry the workflow (with this run's settings) and the prompt, as from ComfyUI's own UI.

Model files: the names the workflow's loaders pick (or --model/--text-encoder/--vae/--controlnet/--lora: a
file name in the models folder, or a path) are looked up in --models-dir (diffusion_models/ or unet/,
text_encoders/ or clip/, vae/, model_patches/ or controlnet/, loras/). qwen_3_4b_fp8_mixed.safetensors
stands in for a missing qwen_3_4b.safetensors. Only when none of the workflow's files is there are small
random-weight demo models synthesised (the picture is then noise, and the script says so); when some are
there and some are not, it stops and lists what is missing and where to download it.

Limits: width and height 16 to 4096 pixels, multiples of 16; steps 1 to 100 on the Z-Image samplers.

Progress (each node, each sampling step) goes to stderr; the result lines (the saved PNGs, an enhanced
prompt) to stdout. The first Ctrl-C cancels the run as ComfyUI's Cancel button does, a second one stops at
once; the temporary folders are removed either way. Exit codes: 0 done, 1 the workflow failed or model
files are missing, 2 bad arguments or workflow file, 130 interrupted.
"""


from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Only the standard library until the arguments are checked: run_workflow.sh runs this check with the
# system's python3 before any setup (CHECK_ONLY_ENV), so --help and argument errors answer at once.
from scripts.comfy_headless import (  # noqa: E402
    HeadlessComfyUI,
    RunResult,
    WorkflowError,
    load_workflow,
    set_widget_value,
    ui_to_api,
)
from zimage_core.constants import MAX_SIDE  # noqa: E402
from zimage_core.constants import PIXEL_MULTIPLE as MULTIPLE  # noqa: E402

PROG = "run_workflow.py"
DEFAULT_WORKFLOW = ROOT / "workflows" / "z_image_turbo_text_to_image.json"
DEFAULT_MODELS_DIR = ROOT / ".comfyui" / "ComfyUI" / "models"
DOWNLOADS = "https://huggingface.co/Comfy-Org/z_image_turbo/tree/main/split_files/"
CONTROLNET_DOWNLOAD = "https://huggingface.co/alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1"
# With this set, main() checks the arguments and the workflow file and exits: 0 when the run may go on,
# ANSWERED when it printed --help, 2 on an error (run_workflow.sh).
CHECK_ONLY_ENV = "ZIMAGE_RUN_CHECK_ONLY"
ANSWERED = 99


@dataclass(frozen=True)
class Role:
    option: str  # command-line option that picks the file
    what: str
    loaders: tuple[str, ...]  # node types of the workflow's loaders for it
    widget: str  # their file-name input
    folder: str  # ComfyUI model folder
    also: tuple[str, ...] = ()  # other folder names ComfyUI reads for the same models
    download: str = ""
    many: bool = False  # the option may be repeated: one file per loader, in the workflow's node order


ROLES = (
    Role("--model", "diffusion model", ("ZImageModelLoader",), "model_name", "diffusion_models", ("unet",),
         DOWNLOADS + "diffusion_models"),
    Role("--text-encoder", "text encoder", ("ZImageTextEncoderLoader",), "text_encoder_name", "text_encoders",
         ("clip",), DOWNLOADS + "text_encoders"),
    Role("--vae", "VAE", ("ZImageVAELoader",), "vae_name", "vae", (), DOWNLOADS + "vae"),
    Role("--controlnet", "ControlNet", ("ZImageControlNetLoader",), "control_net_name", "model_patches",
         ("controlnet",), CONTROLNET_DOWNLOAD + " (any Fun ControlNet Union file; README, ControlNet)"),
    Role("--lora", "LoRA", ("ZImageLoraLoader", "LoraLoaderModelOnly", "LoraLoader"), "lora_name", "loras", (),
         "a Z-Image(-Turbo) LoRA of your choice (README, LoRAs)", many=True),
)
# Files that can stand in for a missing one of the workflow's (not for an explicit option's).
ALTERNATIVES = {"qwen_3_4b.safetensors": ("qwen_3_4b_fp8_mixed.safetensors",)}
SAMPLERS = ("ZImageTurboSampler", "ZImageImg2ImgSampler", "KSampler")
ENHANCER = "ZImagePromptEnhancer"


class UsageError(Exception):
    """Bad input from the command line or the workflow file: one line, exit code 2."""


class MissingModels(Exception):
    """Some model files are missing (message lists them): exit code 1."""


# ----------------------------------------------------------------------------- command line

def _int_option(minimum: int, multiple: int = 1, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small (at least {minimum})")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is too large (at most {maximum})")
        if value % multiple:
            raise argparse.ArgumentTypeError(f"{value} is not a multiple of {multiple} (Z-Image sizes are)")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", type=Path, metavar="FILE", default=DEFAULT_WORKFLOW,
                        help="UI-format workflow JSON (default: workflows/z_image_turbo_text_to_image.json)")
    parser.add_argument("--models-dir", type=Path, metavar="DIR",
                        help="a ComfyUI models folder (with diffusion_models/, text_encoders/, vae/, ...); "
                             "default .comfyui/ComfyUI/models")
    for role in ROLES:
        parser.add_argument(role.option, metavar="FILE", action="append" if role.many else "store",
                            help=f"the {role.what}: a file name in MODELS_DIR/{role.folder}/ or a path "
                                 "(default: the workflow's choice)"
                                 + ("; repeat it for each LoRA loader, in the workflow's node order"
                                    if role.many else ""))
    parser.add_argument("--output-dir", type=Path, metavar="DIR", default=ROOT / "output",
                        help="where PNGs go (default output/)")
    parser.add_argument("--prompt", metavar="TEXT",
                        help="the workflow's (positive) prompt text; on the prompt-enhancer workflow, the idea "
                             "the enhancer turns into the prompt")
    side = f"{MULTIPLE} to {MAX_SIDE}, a multiple of {MULTIPLE}"
    parser.add_argument("--image", type=Path, metavar="FILE",
                        help="the picture for the workflow's LoadImage nodes (img2img, inpaint, ControlNet "
                             "workflows); for inpainting, its transparent pixels are the area to repaint, as "
                             "ComfyUI's mask editor saves it (default: the workflow's choice)")
    parser.add_argument("--width", metavar="N", type=_int_option(MULTIPLE, MULTIPLE, MAX_SIDE),
                        help=f"image width in pixels, {side}")
    parser.add_argument("--height", metavar="N", type=_int_option(MULTIPLE, MULTIPLE, MAX_SIDE),
                        help=f"image height in pixels, {side}")
    parser.add_argument("--seed", metavar="N", type=_int_option(0),
                        help="seed of every sampler in the workflow (0 or more)")
    parser.add_argument("--steps", metavar="N", type=_int_option(1),
                        help="steps of every sampler in the workflow (1 or more; the Z-Image samplers take up "
                             "to 100)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    parser.add_argument("--verbose", action="store_true",
                        help="show ComfyUI's own log (informational lines, and a failing node's traceback)")
    return parser


def check_arguments(args: argparse.Namespace) -> dict:
    """What can be checked without ComfyUI: the workflow file, the folders. Returns the workflow."""
    try:
        workflow = load_workflow(args.workflow)
    except WorkflowError as e:
        raise UsageError(f"--workflow {e}") from None
    if args.models_dir is not None:
        models_dir = args.models_dir.expanduser()
        if not models_dir.is_dir():
            raise UsageError(f"--models-dir {args.models_dir}: "
                             + ("is not a folder" if models_dir.exists() else "no such folder")
                             + " (give ComfyUI's models folder, the one holding diffusion_models/, vae/, ...)")
    if args.image is not None and not args.image.expanduser().is_file():
        raise UsageError(f"--image {args.image}: " + ("is not a file" if args.image.expanduser().exists()
                                                        else "no such file"))
    output = args.output_dir.expanduser().absolute()
    existing = next(p for p in (output, *output.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise UsageError(f"--output-dir {args.output_dir}: {existing} is a file, not a folder")
    return workflow


# ----------------------------------------------------------------------------- model files

@dataclass
class Found:
    role: Role
    requested: str
    path: Path | None = None  # the file (or model folder) found
    name: str | None = None  # its name inside the model folder it was found in (None: outside, a path)
    looked: list[str] = field(default_factory=list)  # where it was looked for
    substituted: bool = False  # an alternative was found instead of the requested name


def find_model(role: Role, name: str, models_dir: Path, explicit: bool) -> Found:
    found = Found(role, name)
    candidates = [name, *([] if explicit else ALTERNATIVES.get(name, ()))]
    for candidate in candidates:
        for folder in (role.folder, *role.also):
            path = models_dir / folder / candidate
            found.looked.append(str(path))
            # a file, or a model folder the loader lists as "name/" (diffusers ControlNet)
            if path.is_file() or (candidate.endswith("/") and (path / "config.json").is_file()):
                found.path, found.name, found.substituted = path, candidate, candidate != name
                return found
    # A component of a diffusers download in models/diffusers, as the loaders list them.
    if "/" in name and not os.path.isabs(name) and (models_dir / "diffusers" / name).is_dir():
        found.path, found.name = models_dir / "diffusers" / name, name
        return found
    if explicit:
        path = Path(name).expanduser()
        if str(path.absolute()) not in found.looked:
            found.looked.append(str(path.absolute()))
        if path.is_file() or (path / "config.json").is_file():
            found.path = path.absolute()
    return found


def missing_report(missing: list[Found], present: list[Found], models_dir: Path) -> str:
    lines = [f"{len(missing)} of the {len(missing) + len(present)} model files the workflow needs "
             f"{'is' if len(missing) == 1 else 'are'} missing:"]
    for f in missing:
        lines.append(f"  {f.role.what}: {f.requested}, looked for at:")
        lines += [f"      {place}" for place in f.looked]
        lines.append(f"    download: {f.role.download}")
    for f in present:
        lines.append(f"  {f.role.what}: found {f.path}")
    options = "/".join(dict.fromkeys(f.role.option for f in missing))
    lines.append(f"Put the missing files into {models_dir}/<folder>/, pass --models-dir, or point {options} at "
                 "them. (Random demo weights are used only when none of the model files is there.)")
    return "\n".join(lines)


def _given(args: argparse.Namespace, role: Role) -> list[str]:
    value = getattr(args, role.option[2:].replace("-", "_"))
    return [] if value is None else list(value) if role.many else [value]


def choose_models(prompt: dict, args: argparse.Namespace, models_dir: Path) -> tuple[dict, bool]:
    """The model file for each loader node, {node id: (role, Found)}; and whether to use demo weights."""
    chosen: dict[str, tuple[Role, Found]] = {}
    for role in ROLES:
        given = _given(args, role)
        loaders = sorted((nid for nid, n in prompt.items() if n["class_type"] in role.loaders), key=int)
        kinds = " or ".join(role.loaders)
        if given and not loaders:
            raise UsageError(f"{role.option}: {args.workflow.name} has no {kinds} node to give it to")
        if role.many and len(given) > len(loaders):
            raise UsageError(f"{role.option} is given {len(given)} times, but {args.workflow.name} has "
                             f"{len(loaders)} {kinds} node{'s' if len(loaders) > 1 else ''}")
        for i, nid in enumerate(loaders):
            explicit = (given[i] if i < len(given) else None) if role.many else (given[0] if given else None)
            name = explicit or prompt[nid]["inputs"].get(role.widget)
            if not isinstance(name, str):
                raise UsageError(f"node {nid} ({prompt[nid]['class_type']}) of {args.workflow.name} names no file")
            chosen[nid] = (role, find_model(role, name, models_dir, bool(explicit)))
    found = [f for _, f in chosen.values()]
    missing = [f for f in found if f.path is None]
    any_explicit = any(_given(args, r) for r in ROLES)
    if missing and (len(missing) < len(found) or any_explicit):
        raise MissingModels(missing_report(missing, [f for f in found if f.path], models_dir))
    return chosen, bool(found) and len(missing) == len(found)


def expose_models(chosen: dict, stage_dir: Path) -> dict[str, str]:
    """Make ComfyUI's loaders see each chosen file under a name; returns {node id: name to pick}.

    A file ComfyUI already finds under its name in the models folder is used as is; any other (a path,
    a file in a legacy folder ComfyUI is not told about) is linked into a staging folder that is
    registered first for its model folder.
    """
    import folder_paths

    names = {}
    for nid, (role, found) in chosen.items():
        path = found.path
        if path.is_dir() and found.name and "/" in found.name.rstrip("/"):  # diffusers `<pipeline>/<component>`
            folder_paths.add_model_folder_path("diffusers", str(path.parent.parent), is_default=True)
            names[nid] = found.name
            continue
        if path.is_dir():  # a model folder (diffusers ControlNet), listed as "name/"
            link, name = stage_dir / role.folder / path.name, path.name + "/"
        else:
            current = found.name and folder_paths.get_full_path(role.folder, found.name)
            if current and os.path.realpath(current) == os.path.realpath(path):
                names[nid] = found.name
                continue
            if path.suffix not in (".safetensors", ".gguf"):
                raise UsageError(f"{role.option} {found.requested}: not a .safetensors or .gguf file (only those "
                                 "are loaded)")
            link, name = stage_dir / role.folder / path.name, path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and os.path.realpath(link) != os.path.realpath(path):
            raise UsageError(f"two different {role.folder} files named {path.name} were chosen")
        if not link.is_symlink():
            link.symlink_to(path.resolve())
        folder_paths.add_model_folder_path(role.folder, str(link.parent), is_default=True)
        names[nid] = name
    return names


def use_demo_models(chosen: dict, models_dir: Path) -> dict[str, str]:
    import folder_paths

    from zimage_core.demo_weights import DEMO_GGUF_FILES, write_demo_gguf_models, write_demo_models

    demo_dir = ROOT / "demo_models"
    wanted = ", ".join(dict.fromkeys(f"{f.requested} ({f.role.folder}/)" for _, f in chosen.values()))
    print(f"NOTE: none of the model files is in {models_dir}: {wanted}.")
    print("      Using small RANDOM demo weights instead (synthesised into "
          f"{demo_dir}); the picture will be noise, not a real image.")
    options = "/".join(dict.fromkeys(role.option for role, _ in chosen.values()))
    print("      For real images put the Z-Image-Turbo files there (see README), pass --models-dir, "
          f"or {options}.", flush=True)
    names = write_demo_models(demo_dir)
    for folder in names:
        folder_paths.add_model_folder_path(folder, str(demo_dir / folder), is_default=True)
    out = {nid: names[role.folder] for nid, (role, _) in chosen.items()}
    gguf_nodes = {nid for nid, (role, f) in chosen.items() if f.requested.lower().endswith(".gguf")
                  and role.folder in DEMO_GGUF_FILES}
    if gguf_nodes:  # the workflow names GGUF files: the demo models as GGUF too
        gguf_names = write_demo_gguf_models(demo_dir)
        out.update({nid: gguf_names[chosen[nid][0].folder] for nid in gguf_nodes})
    return out


def use_demo_pictures(prompt: dict, input_dir: Path) -> None:
    """A generated picture for each LoadImage whose file is not in ComfyUI's input folder (demo mode only:
    ComfyUI's example.png is not in every ComfyUI). Its alpha has a transparent square, so the mask
    LoadImage outputs (1 where transparent, for inpainting) is not empty."""
    import numpy as np
    from PIL import Image

    for nid, node in sorted(prompt.items()):
        name = node["inputs"].get("image") if node["class_type"] == "LoadImage" else None
        if not isinstance(name, str) or (input_dir / name).exists() or "/" in name or name.startswith("."):
            continue
        h, w = 128, 128
        y, x = np.mgrid[0:h, 0:w]
        rgba = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x // 32 + y // 32) % 2 * 255,
                         np.full_like(x, 255)], -1).astype(np.uint8)
        rgba[h // 4:3 * h // 4, w // 4:3 * w // 4, 3] = 0
        Image.fromarray(rgba, "RGBA").save(input_dir / name)
        print(f"NOTE: {name} (node {nid}, LoadImage) is not in ComfyUI's input folder; using a generated "
              "demo picture with a masked square instead.")


# ----------------------------------------------------------------------------- overrides

def _prompt_text_nodes(prompt: dict, option: str, targets: list[str]) -> list[str]:
    """The nodes holding the text that becomes the samplers' positive prompt: the text encoder's own `text`
    widget, or, where that input is wired (the prompt enhancer's output), the widget it comes from."""
    found = []
    for sampler in targets:
        link = prompt[sampler]["inputs"].get("positive")
        if not isinstance(link, list):
            continue
        nid, seen = link[0], set()
        while nid not in seen and "text" in prompt[nid]["inputs"]:
            seen.add(nid)
            text = prompt[nid]["inputs"]["text"]
            if isinstance(text, str):
                found.append(nid)
                break
            nid = text[0]  # a link: [node id, slot]
    if not found:
        raise UsageError(f"{option}: no prompt text feeds a sampler in this workflow")
    return list(dict.fromkeys(found))


def apply_overrides(workflow: dict, prompt: dict, args: argparse.Namespace, node_classes: dict,
                    model_names: dict[str, str]) -> None:
    """Write the command line's choices into the UI workflow (which is what runs and what the PNGs embed)."""
    def setw(nid: str, name: str, value) -> None:
        set_widget_value(workflow, nid, name, value, node_classes)

    def targets(option: str, kinds: tuple[str, ...]) -> list[str]:
        found = [nid for nid, n in prompt.items() if n["class_type"] in kinds]
        if not found:
            raise UsageError(f"{option}: {args.workflow.name} has no {' or '.join(kinds)} node to apply it to")
        return found

    for nid, name in model_names.items():
        role = next(r for r in ROLES if prompt[nid]["class_type"] in r.loaders)
        setw(nid, role.widget, name)
    if args.prompt is not None:
        for nid in _prompt_text_nodes(prompt, "--prompt", targets("--prompt", SAMPLERS)):
            if prompt[nid]["class_type"] == ENHANCER:
                print(f"NOTE: --prompt is the idea of the prompt enhancer (node {nid}), which writes the prompt.",
                      file=sys.stderr)
            setw(nid, "text", args.prompt)
    if args.image is not None:
        for nid in targets("--image", ("LoadImage",)):
            setw(nid, "image", args.image.name)
    if args.width or args.height:
        for nid in targets("--width/--height", ("ZImageEmptyLatent",)):
            setw(nid, "preset", "custom")
            if args.width:
                setw(nid, "width", args.width)
            if args.height:
                setw(nid, "height", args.height)
    for option, value in (("seed", args.seed), ("steps", args.steps)):
        if value is not None:
            for nid in targets(f"--{option}", SAMPLERS):
                setw(nid, option, value)


# ----------------------------------------------------------------------------- progress and messages

class Progress:
    """Prints which node runs and every step of a progress bar (e.g. sampling steps) to stderr."""

    def __init__(self, prompt: dict) -> None:
        self.prompt = prompt
        self.node: str | None = None
        self.previous_hook = None
        self.last: tuple | None = None

    def event(self, event, data) -> None:
        if event == "executing" and isinstance(data, dict) and data.get("node") is not None:
            self.node = str(data["node"])
            print(f"  node {self.node}: {node_label(self.prompt, self.node)}", file=sys.stderr, flush=True)

    def hook(self, value, total, preview, node_id=None, **kwargs) -> None:
        import comfy.model_management

        if self.previous_hook is not None:
            self.previous_hook(value, total, preview, node_id=node_id, **kwargs)
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel, as ComfyUI's own hook
        if total and (self.node, value, total) != self.last:  # a bar may report a step twice
            self.last = (self.node, value, total)
            print(f"    step {value}/{total}", file=sys.stderr, flush=True)

    # Our step lines replace tqdm's console bar, and every step is printed (ComfyUI 0.18.1 throttles the
    # hook to one call per 100 ms otherwise).
    QUIET_SETTINGS = {"PROGRESS_BAR_ENABLED": False, "PROGRESS_THROTTLE_MIN_INTERVAL": 0.0,
                      "PROGRESS_THROTTLE_MIN_PERCENT": 0.0}

    def __enter__(self) -> Progress:
        import comfy.utils

        self.previous_hook = comfy.utils.PROGRESS_BAR_HOOK
        self.previous_settings = {k: getattr(comfy.utils, k) for k in self.QUIET_SETTINGS if hasattr(comfy.utils, k)}
        for name in self.previous_settings:
            setattr(comfy.utils, name, self.QUIET_SETTINGS[name])
        comfy.utils.set_progress_bar_global_hook(self.hook)
        return self

    def __exit__(self, *exc) -> None:
        import comfy.utils

        comfy.utils.set_progress_bar_global_hook(self.previous_hook)
        for name, value in self.previous_settings.items():
            setattr(comfy.utils, name, value)


def node_label(prompt: dict, nid: str) -> str:
    node = prompt.get(str(nid), {})
    title = node.get("_meta", {}).get("title")
    return node.get("class_type", "?") + (f" \"{title}\"" if title else "")


def failure_lines(result: RunResult, prompt: dict) -> list[str]:
    """What failed, one line per problem: the failing node and its message (no traceback); a validation
    error once per node, naming the input it is about (ComfyUI repeats a custom validation message under
    every input the node validates)."""
    error = result.error or {}
    if "exception_message" in error:  # execution_error
        nid = str(error.get("node_id"))
        return [f"node {nid} ({node_label(prompt, nid)}): {str(error['exception_message']).strip()}"]
    lines = []
    for nid, node_error in result.node_errors.items():
        messages = []
        for e in node_error.get("errors", []):
            details, name = str(e.get("details", "")), (e.get("extra_info") or {}).get("input_name")
            if e.get("type") == "custom_validation_failed" and name and details.startswith(f"{name} - "):
                text = details[len(name) + 3:]  # the node's own message, which names its input
            else:
                text = f"{e.get('message', '')}: {details}" if details else str(e.get("message", ""))
            messages.append(text)
        lines += [f"node {nid} ({node_label(prompt, nid)}): {m}" for m in dict.fromkeys(messages)]
    if not lines:
        lines.append(" | ".join(str(error.get(k)) for k in ("message", "details") if error.get(k)))
    return lines


class QuietComfyErrors(logging.Filter):
    """Drops the errors ComfyUI's executor logs (validation reports, a failing node's traceback): this job
    reports each failure itself, once (failure_lines)."""

    def __init__(self, comfyui_dir: Path) -> None:
        super().__init__()
        self.execution = os.path.realpath(comfyui_dir / "execution.py")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and os.path.realpath(record.pathname) == self.execution)


@contextlib.contextmanager
def ctrl_c_cancels():
    """While the prompt runs, a first Ctrl-C cancels it as ComfyUI's Cancel button does (at the next
    step or node, so the executor ends cleanly); a second one stops at once. Yields whether it was pressed.

    The handler runs between two bytecodes of the main thread, possibly inside its write to sys.stderr,
    so it must not touch Python's buffered streams: it sets flags and writes with os.write."""
    import comfy.model_management

    pressed: list[bool] = []

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)
        comfy.model_management.interrupt_current_processing(True)  # a flag under an RLock: reentrant
        with contextlib.suppress(OSError):
            os.write(2, b"\nCancelling (Ctrl-C again to stop at once) ...\n")

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # e.g. ignored: leave it so
        yield pressed
        return
    signal.signal(signal.SIGINT, handler)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# ----------------------------------------------------------------------------- main

def run(args: argparse.Namespace, work_dir: Path) -> int:
    workflow = check_arguments(args)  # before booting ComfyUI: bad input fails at once
    try:
        import torch
    except ImportError:
        raise UsageError("torch is not installed for this Python: run ./scripts/run_workflow.sh (it sets up "
                         ".venv), or .venv/bin/python scripts/run_workflow.py") from None

    cpu = args.cpu or not torch.cuda.is_available()
    models_dir = (args.models_dir or DEFAULT_MODELS_DIR).expanduser().resolve()
    output_dir = args.output_dir.expanduser().resolve()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir {args.output_dir}: cannot be made ({e.strerror or e})") from None
    try:
        comfy = HeadlessComfyUI(models_dir, work_dir / "comfyui", output_dir=output_dir, cpu=cpu)
    except FileNotFoundError as e:
        raise MissingModels(str(e)) from None
    print(f"Starting ComfyUI ({'CPU' if cpu else 'GPU'}) ...", file=sys.stderr, flush=True)
    # ComfyUI warns about optional extras it cannot import (e.g. audio nodes without torchaudio); those
    # do not concern this job, so only errors are shown while it boots.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO if args.verbose else logging.ERROR)
    comfy.start()
    logging.getLogger().setLevel(logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:
        logging.getLogger().addFilter(QuietComfyErrors(comfy.comfyui_dir))
    node_classes = comfy.node_classes
    try:
        prompt = ui_to_api(workflow, node_classes)
    except WorkflowError as e:
        raise UsageError(f"--workflow {args.workflow}: {e}") from None
    chosen, demo = choose_models(prompt, args, models_dir)
    if demo:
        names = use_demo_models(chosen, models_dir)
        if args.image is None:
            use_demo_pictures(prompt, comfy.input_dir)
    else:
        for _, found in chosen.values():
            if found.substituted:
                print(f"NOTE: {found.role.what} {found.requested} not found; using {found.path}.")
        names = expose_models(chosen, work_dir / "models")
    if args.image is not None:
        shutil.copyfile(args.image.expanduser(), comfy.input_dir / args.image.name)
    apply_overrides(workflow, prompt, args, node_classes, names)
    prompt = ui_to_api(workflow, node_classes)
    print(f"Running {args.workflow.name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with Progress(prompt) as progress, ctrl_c_cancels() as cancelled:
        result = comfy.run(prompt, workflow=workflow, listener=progress.event)
    if cancelled and not result.ok:
        raise KeyboardInterrupt
    if not result.ok:
        lines = failure_lines(result, prompt)
        print(f"ERROR: the workflow failed: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(f"       {line}", file=sys.stderr)
        return 1
    for nid, node in sorted(prompt.items()):
        if node["class_type"] == ENHANCER:
            out = result.outputs.get(nid, {})
            for key, label in (("text", "Enhanced prompt"), ("negative_prompt", "Negative prompt")):
                for text in out.get(key, []):
                    print(f"{label} (node {nid}): {text}")
    images = result.images(comfy.output_dir)
    print(f"Done in {time.perf_counter() - start:.1f} s.")
    for path in images:
        print(f"Saved: {path}")
    if demo:
        print("(Random demo weights: the image is noise by design.)")
    if not images:
        print("ERROR: the workflow saved no image (does it end in a SaveImage node?)", file=sys.stderr)
    return 0 if images else 1


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C, so the temporary folder is removed


def check_only(argv: list[str] | None) -> int:
    """run_workflow.sh's first step, before any setup: --help, the arguments and the workflow file."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return ANSWERED if e.code == 0 else int(e.code or 0)
    try:
        check_arguments(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    if os.environ.get(CHECK_ONLY_ENV):
        return check_only(argv)
    args = build_parser().parse_args(argv)
    work_dir = Path(tempfile.mkdtemp(prefix="zimage-run-"))
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args, work_dir)
    except (UsageError, WorkflowError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except MissingModels as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
