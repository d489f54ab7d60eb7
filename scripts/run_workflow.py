"""Main job: run a shipped workflow (default: text-to-image) headless in a real ComfyUI; print the PNG path.

    ./scripts/run_workflow.sh                      # setup (idempotent) + this script
    ./scripts/run_workflow.sh --models-dir ~/ComfyUI/models --prompt "a lighthouse at dusk"
    ./scripts/run_workflow.sh --model ~/Downloads/z_image_turbo_bf16.safetensors --text-encoder ... --vae ...

The workflow file is executed as users run it: converted from the UI format to ComfyUI's API format and
queued into ComfyUI's own executor, with this pack loaded by ComfyUI's custom-node loader. The saved
PNGs carry the workflow (with this run's settings) and the prompt, as from ComfyUI's own UI.

Model files: the names the workflow's loaders pick (or --model/--text-encoder/--vae: a file name in the
models folder, or a path) are looked up in --models-dir (diffusion_models/ or unet/, text_encoders/ or
clip/, vae/). qwen_3_4b_fp8_mixed.safetensors stands in for a missing qwen_3_4b.safetensors. Only when
none of the files is there are small random-weight demo models synthesised (the picture is then noise,
and the script says so); when some are there and some are not, it stops and lists what is missing.

Progress (each node, each sampling step) goes to stderr; the result lines to stdout. The first Ctrl-C
cancels the run as ComfyUI's Cancel button does, a second one stops at once; the temporary folders
are removed either way.
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

from scripts.comfy_headless import (  # noqa: E402
    HeadlessComfyUI,
    WorkflowError,
    load_workflow,
    set_widget_value,
    ui_to_api,
)

PROG = "run_workflow.py"
DEFAULT_WORKFLOW = ROOT / "workflows" / "z_image_turbo_text_to_image.json"
DEFAULT_MODELS_DIR = ROOT / ".comfyui" / "ComfyUI" / "models"
DOWNLOADS = "https://huggingface.co/Comfy-Org/z_image_turbo/tree/main/split_files/"


@dataclass(frozen=True)
class Role:
    option: str  # command-line option that picks the file
    what: str
    loader: str  # node type of the workflow's loader
    widget: str  # its file-name input
    folder: str  # ComfyUI model folder
    also: tuple[str, ...] = ()  # legacy folder names ComfyUI reads for the same models


ROLES = (
    Role("--model", "diffusion model", "ZImageModelLoader", "model_name", "diffusion_models", ("unet",)),
    Role("--text-encoder", "text encoder", "ZImageTextEncoderLoader", "text_encoder_name", "text_encoders", ("clip",)),
    Role("--vae", "VAE", "ZImageVAELoader", "vae_name", "vae"),
)
# Files that can stand in for a missing one of the workflow's (not for an explicit option's).
ALTERNATIVES = {"qwen_3_4b.safetensors": ("qwen_3_4b_fp8_mixed.safetensors",)}
SAMPLERS = ("ZImageTurboSampler", "ZImageImg2ImgSampler")


class UsageError(Exception):
    """Bad input from the command line or the workflow file: one line, exit code 2."""


class MissingModels(Exception):
    """Some model files are missing (message lists them): exit code 1."""


# ----------------------------------------------------------------------------- command line

def _int_option(minimum: int, multiple: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small (at least {minimum})")
        if value % multiple:
            raise argparse.ArgumentTypeError(f"{value} is not a multiple of {multiple} (Z-Image sizes are)")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", type=Path, metavar="FILE", default=DEFAULT_WORKFLOW,
                        help="UI-format workflow JSON (default: workflows/z_image_turbo_text_to_image.json)")
    parser.add_argument("--models-dir", type=Path, metavar="DIR", default=DEFAULT_MODELS_DIR,
                        help="a ComfyUI models folder (with diffusion_models/, text_encoders/, vae/); "
                             "default .comfyui/ComfyUI/models")
    for role in ROLES:
        parser.add_argument(role.option, metavar="FILE",
                            help=f"the {role.what}: a file name in MODELS_DIR/{role.folder}/ or a path "
                                 "(default: the workflow's choice)")
    parser.add_argument("--output-dir", type=Path, metavar="DIR", default=ROOT / "output", help="where PNGs go (default output/)")
    parser.add_argument("--prompt", metavar="TEXT", help="replace the workflow's (positive) prompt text")
    parser.add_argument("--width", metavar="N", type=_int_option(16, 16), help="image width, a positive multiple of 16")
    parser.add_argument("--height", metavar="N", type=_int_option(16, 16), help="image height, a positive multiple of 16")
    parser.add_argument("--seed", metavar="N", type=_int_option(0), help="seed of every sampler in the workflow (0 or more)")
    parser.add_argument("--steps", metavar="N", type=_int_option(1), help="steps of every sampler in the workflow (1 or more)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    return parser


# ----------------------------------------------------------------------------- model files

@dataclass
class Found:
    role: Role
    requested: str
    path: Path | None = None  # the file (or diffusers component folder) found
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
            if path.is_file():
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
        if path.is_file():
            found.path = path.absolute()
    return found


def missing_report(missing: list[Found], present: list[Found], models_dir: Path) -> str:
    lines = [f"{len(missing)} of the {len(missing) + len(present)} model files the workflow needs "
             f"{'is' if len(missing) == 1 else 'are'} missing:"]
    for f in missing:
        lines.append(f"  {f.role.what}: {f.requested}, looked for at:")
        lines += [f"      {place}" for place in f.looked]
        lines.append(f"    download: {DOWNLOADS}{f.role.folder}")
    for f in present:
        lines.append(f"  {f.role.what}: found {f.path}")
    options = "/".join(f.role.option for f in missing)
    lines.append(f"Put the missing files into {models_dir}/<folder>/, pass --models-dir, or point {options} at "
                 "them. (Random demo weights are used only when none of the model files is there.)")
    return "\n".join(lines)


def choose_models(prompt: dict, args: argparse.Namespace, models_dir: Path) -> tuple[dict, bool]:
    """The model file for each loader node, {node id: (role, path)}; and whether to use demo weights."""
    chosen: dict[str, tuple[Role, Found]] = {}
    for role in ROLES:
        explicit = getattr(args, role.option[2:].replace("-", "_"))
        loaders = [nid for nid, n in prompt.items() if n["class_type"] == role.loader]
        if explicit and not loaders:
            raise UsageError(f"{role.option}: {args.workflow.name} has no {role.loader} node to give it to")
        for nid in loaders:
            name = explicit or prompt[nid]["inputs"].get(role.widget)
            if not isinstance(name, str):
                raise UsageError(f"node {nid} ({role.loader}) of {args.workflow.name} names no file")
            chosen[nid] = (role, find_model(role, name, models_dir, bool(explicit)))
    found = [f for _, f in chosen.values()]
    missing = [f for f in found if f.path is None]
    any_explicit = any(getattr(args, r.option[2:].replace("-", "_")) for r in ROLES)
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
        if path.is_dir():  # diffusers component, `<pipeline>/<component>`
            folder_paths.add_model_folder_path("diffusers", str(path.parent.parent), is_default=True)
            names[nid] = found.name
            continue
        current = found.name and folder_paths.get_full_path(role.folder, found.name)
        if current and os.path.realpath(current) == os.path.realpath(path):
            names[nid] = found.name
            continue
        if path.suffix != ".safetensors":
            raise UsageError(f"{role.option} {found.requested}: not a .safetensors file (only those are loaded)")
        link = stage_dir / role.folder / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and os.path.realpath(link) != os.path.realpath(path):
            raise UsageError(f"two different {role.folder} files named {path.name} were chosen")
        if not link.is_symlink():
            link.symlink_to(path.resolve())
        folder_paths.add_model_folder_path(role.folder, str(link.parent), is_default=True)
        names[nid] = path.name
    return names


def use_demo_models(chosen: dict, models_dir: Path) -> dict[str, str]:
    import folder_paths

    from zimage_core.demo_weights import write_demo_models

    demo_dir = ROOT / "demo_models"
    wanted = ", ".join(f"{f.requested} ({f.role.folder}/)" for _, f in chosen.values())
    print(f"NOTE: none of the model files is in {models_dir}: {wanted}.")
    print("      Using small RANDOM demo weights instead (synthesised into "
          f"{demo_dir}); the picture will be noise, not a real image.")
    print("      For real images put the Z-Image-Turbo files there (see README), pass --models-dir, "
          "or --model/--text-encoder/--vae.", flush=True)
    names = write_demo_models(demo_dir)
    for folder in names:
        folder_paths.add_model_folder_path(folder, str(demo_dir / folder), is_default=True)
    return {nid: names[role.folder] for nid, (role, _) in chosen.items()}


# ----------------------------------------------------------------------------- overrides

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
        role = next(r for r in ROLES if r.loader == prompt[nid]["class_type"])
        setw(nid, role.widget, name)
    if args.prompt is not None:
        # The text nodes feeding the samplers' positive input (a negative prompt stays as it is).
        texts = {prompt[s]["inputs"]["positive"][0] for s in targets("--prompt", SAMPLERS)
                 if isinstance(prompt[s]["inputs"].get("positive"), list)}
        texts = [t for t in texts if "text" in prompt[t]["inputs"]]
        if not texts:
            raise UsageError(f"--prompt: no prompt text node feeds a sampler in {args.workflow.name}")
        for nid in texts:
            setw(nid, "text", args.prompt)
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


# ----------------------------------------------------------------------------- progress

class Progress:
    """Prints which node runs and each step of a progress bar (e.g. sampling steps) to stderr."""

    def __init__(self, prompt: dict) -> None:
        self.prompt = prompt
        self.node: str | None = None
        self.previous_hook = None

    def event(self, event, data) -> None:
        if event == "executing" and isinstance(data, dict) and data.get("node") is not None:
            self.node = str(data["node"])
            node = self.prompt.get(self.node, {})
            title = node.get("_meta", {}).get("title")
            label = node.get("class_type", "?") + (f" \"{title}\"" if title else "")
            print(f"  node {self.node}: {label}", file=sys.stderr, flush=True)

    def hook(self, value, total, preview, node_id=None, **kwargs) -> None:
        import comfy.model_management

        if self.previous_hook is not None:
            self.previous_hook(value, total, preview, node_id=node_id, **kwargs)
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel, as ComfyUI's own hook
        # Long bars (e.g. tiled decoding) print about every tenth of the way.
        if total and (total <= 50 or value in (1, total) or value % max(1, total // 10) == 0):
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


@contextlib.contextmanager
def ctrl_c_cancels():
    """While the prompt runs, a first Ctrl-C cancels it as ComfyUI's Cancel button does (at the next
    step or node, so the executor ends cleanly); a second one stops at once. Yields whether it was pressed."""
    import comfy.model_management

    pressed: list[bool] = []

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)
        print("\nCancelling (Ctrl-C again to stop at once) ...", file=sys.stderr, flush=True)
        comfy.model_management.interrupt_current_processing(True)

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
    try:  # before booting ComfyUI: a bad file fails at once
        workflow = load_workflow(args.workflow)
    except WorkflowError as e:
        raise UsageError(f"--workflow {e}") from None
    import torch

    cpu = args.cpu or not torch.cuda.is_available()
    models_dir = args.models_dir.expanduser().resolve()
    comfy = HeadlessComfyUI(models_dir, work_dir / "comfyui", output_dir=args.output_dir.resolve(), cpu=cpu)
    print(f"Starting ComfyUI ({'CPU' if cpu else 'GPU'}) ...", file=sys.stderr, flush=True)
    # ComfyUI warns about optional extras it cannot import (e.g. audio nodes without torchaudio); those
    # do not concern this job, so only errors are shown while it boots.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.ERROR)
    comfy.start()
    logging.getLogger().setLevel(logging.WARNING)
    node_classes = comfy.node_classes
    prompt = ui_to_api(workflow, node_classes)
    chosen, demo = choose_models(prompt, args, models_dir)
    if demo:
        names = use_demo_models(chosen, models_dir)
    else:
        for _, found in chosen.values():
            if found.substituted:
                print(f"NOTE: {found.role.what} {found.requested} not found; using {found.path}.")
        names = expose_models(chosen, work_dir / "models")
    apply_overrides(workflow, prompt, args, node_classes, names)
    prompt = ui_to_api(workflow, node_classes)
    print(f"Running {args.workflow.name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with Progress(prompt) as progress, ctrl_c_cancels() as cancelled:
        result = comfy.run(prompt, workflow=workflow, listener=progress.event)
    if cancelled and not result.ok:
        raise KeyboardInterrupt
    if not result.ok:
        print(f"ERROR: the workflow failed: {result.error_message}", file=sys.stderr)
        return 1
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


def main(argv: list[str] | None = None) -> int:
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
