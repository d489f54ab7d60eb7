"""Loading the Z-Image transformer from a ComfyUI single file or a diffusers `transformer/` folder.

Both layouts are read lazily through `open_checkpoint`; the model is built on the meta device and each
parameter is materialized from its tensor(s) one at a time, so RAM never holds a second full copy, and
every parameter ends up in memory of its own (never a view of the file). Anything that is not a Z-Image
transformer fails with a `CheckpointError` that names the file, what was expected, what was found and
the fix; layer numbering, config values and tensor types are all checked before anything is built.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.dequant import (
    FP8_DTYPES,
    FP8_FORMATS,
    GGUF_FORMAT,
    QUANT_SIDE_SUFFIXES,
    SCALE_SUFFIXES,
    quant_configs,
    quant_layers,
    stored_dtype,
)
from ..checkpoint.gguf import GGUFCheckpoint, describe_architecture
from ..checkpoint.io import Checkpoint, open_checkpoint
from ..checkpoint.kinds import is_controlnet_checkpoint
from ..checkpoint.materialise import LayerLoader, read_joined, set_param
from ..checks import (
    BoundsError,
    checkpoint_errors,
    compute_dtype,
    numbered_blocks,
    release_on_error,
)
from ..constants import LATENT_CHANNELS
from ..errors import CheckpointError
from .model import MAX_LAYERS, TransformerConfig, ZImageTransformer

WHAT = "a Z-Image transformer (S3-DiT) checkpoint"
# The official Z-Image-Turbo transformer: tensors in a ComfyUI file (without norm_final) and parameters.
OFFICIAL_KEY_COUNT = 453
OFFICIAL_PARAM_COUNT = 6_154_908_736
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "")
# Present in some ComfyUI exports, not used by the model.
IGNORED_KEYS = frozenset({"norm_final.weight"})
# Side tensors of scaled-fp8 exports: the weight scale is applied at load, the rest is not needed.
_IGNORED_SUFFIXES = ("scale_input", "comfy_quant", *QUANT_SIDE_SUFFIXES)
_IGNORED_MARKERS = frozenset({"scaled_fp8"})

DIFFUSERS_QKV = ("to_q", "to_k", "to_v")
_DIFFUSERS_RENAMES = (
    ("all_x_embedder.2-1.", "x_embedder."),
    ("all_final_layer.2-1.", "final_layer."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
_QKV_RE = re.compile(r"^(.*\.attention\.)(to_q|to_k|to_v)\.weight$")


@dataclass(frozen=True)
class TransformerFormat:
    """Where a transformer's tensors live in a file: naming scheme and key prefix."""

    kind: str  # "comfy" or "diffusers"
    prefix: str


# -- key names -----------------------------------------------------------------------------------

def comfy_key_for_diffusers(key: str) -> tuple[str, int | None]:
    """Map one diffusers key to (ComfyUI key, qkv part) — part is 0/1/2 for to_q/to_k/to_v rows."""
    m = _QKV_RE.match(key)
    if m:
        return m.group(1) + "qkv.weight", DIFFUSERS_QKV.index(m.group(2))
    for old, new in _DIFFUSERS_RENAMES:
        if old in key:
            key = key.replace(old, new)
    return key, None


def comfy_state_dict_from_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers `ZImageTransformer2DModel` state dict to ComfyUI single-file names (no prefix)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list[torch.Tensor | None]] = {}
    for key, value in state_dict.items():
        new, part = comfy_key_for_diffusers(key)
        if part is None:
            out[new] = value
        else:
            qkv.setdefault(new, [None, None, None])[part] = value
    for key, parts in qkv.items():
        if any(p is None for p in parts):
            missing = [DIFFUSERS_QKV[i] for i, p in enumerate(parts) if p is None]
            raise ValueError(f"{key}: diffusers state dict lacks {', '.join(missing)} for this attention layer.")
        out[key] = torch.cat(parts, 0)  # type: ignore[arg-type]
    return out


def detect_transformer_format(keys: Iterable[str], path: object = "<state dict>") -> TransformerFormat:
    """Decide naming scheme and prefix from key names; raise CheckpointError for other models."""
    keys = set(keys)
    for prefix in COMFY_PREFIXES:
        if f"{prefix}all_x_embedder.2-1.weight" in keys or f"{prefix}layers.0.attention.to_q.weight" in keys:
            return TransformerFormat("diffusers", prefix)
        if f"{prefix}cap_embedder.1.weight" in keys or f"{prefix}layers.0.attention.qkv.weight" in keys:
            if f"{prefix}layers.0.adaLN_modulation.1.weight" in keys:
                raise CheckpointError(path, WHAT, "a Lumina-Image 2.0 transformer (adaLN_modulation.1 layers)",
                                      "Lumina 2 is a different model; load z_image_turbo_bf16.safetensors.")
            return TransformerFormat("comfy", prefix)
    raise CheckpointError(path, WHAT, _describe_other_model(keys), _fix_for_other_model(keys))


def _describe_other_model(keys: set[str]) -> str:
    text = " ".join(sorted(keys)[:2000])
    if is_controlnet_checkpoint(keys):
        return "a Z-Image Fun ControlNet Union file (control_layers keys), not the transformer"
    if "double_blocks." in text or "single_blocks." in text:
        return "a FLUX-style transformer (double_blocks/single_blocks keys)"
    if "input_blocks." in text:
        return "a Stable Diffusion / SDXL UNet (input_blocks/output_blocks keys)"
    if "self_attn." in text and ("embed_tokens" in text or "layers." in text):
        return "a text encoder (Qwen3/LLM-style model.layers.N.self_attn keys)"
    if "decoder.conv_in" in text or "encoder.down" in text or "decoder.up" in text:
        return "a VAE (encoder/decoder keys)"
    few = ", ".join(sorted(keys)[:5])
    return f"no Z-Image transformer tensors (first keys: {few})"


def _fix_for_other_model(keys: set[str]) -> str:
    text = " ".join(sorted(keys)[:2000])
    if is_controlnet_checkpoint(keys):
        return ("Put it in models/model_patches and load it with Z-Image ControlNet Loader; here pick "
                "z_image_turbo_bf16.safetensors.")
    if "self_attn." in text:
        return "This is the text encoder: put qwen_3_4b.safetensors in models/text_encoders and load it there."
    if "decoder.conv_in" in text or "encoder.down" in text or "decoder.up" in text:
        return "This is the VAE: put ae.safetensors in models/vae and load it there."
    return ("Load the Z-Image-Turbo transformer: z_image_turbo_bf16.safetensors (models/diffusion_models) "
            "or the transformer/ folder of Tongyi-MAI/Z-Image-Turbo.")


# -- plan: our key -> source tensor(s) ---------------------------------------------------------------

def _plan(keys: Iterable[str], fmt: TransformerFormat) -> dict[str, tuple[str, ...]]:
    """Return {our key: source keys (1, or 3 for a split qkv)} for the tensors under the prefix."""
    plan: dict[str, list[str | None]] = {}
    for key in keys:
        if not key.startswith(fmt.prefix):
            continue  # other components of an all-in-one checkpoint
        name = key[len(fmt.prefix):]
        if name in IGNORED_KEYS or name in _IGNORED_MARKERS or name.endswith(_IGNORED_SUFFIXES + SCALE_SUFFIXES):
            continue
        if fmt.kind == "diffusers":
            new, part = comfy_key_for_diffusers(name)
            if part is not None:
                plan.setdefault(new, [None, None, None])[part] = key
                continue
            name = new
        plan[name] = [key]
    # A split qkv with a part missing is left out, so it is reported as missing.
    return {name: tuple(src) for name, src in plan.items() if None not in src}  # type: ignore[misc]


def _missing_source_names(missing: list[str], fmt: TransformerFormat, keys: Iterable[str]) -> list[str]:
    """Name missing tensors as the file would (diffusers names for a diffusers checkpoint)."""
    if fmt.kind != "diffusers":
        return missing
    keys = set(keys)
    names = []
    for name in missing:
        if name.endswith(".attention.qkv.weight"):
            base = fmt.prefix + name[: -len("qkv.weight")]
            names += [f"{base[len(fmt.prefix):]}{p}.weight" for p in DIFFUSERS_QKV if f"{base}{p}.weight" not in keys]
        else:
            for old, new in _DIFFUSERS_RENAMES:
                name = name.replace(new, old) if new in name and (old.startswith(".") or name.startswith(new)) else name
            names.append(name)
    return names


def _shapes_of(ckpt: Checkpoint | Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    if isinstance(ckpt, Checkpoint):
        return {k: tuple(i.shape) for k, i in ckpt.infos.items()}
    return {k: tuple(v.shape) for k, v in ckpt.items()}


def _source_shape(shapes: Mapping[str, tuple[int, ...]], sources: tuple[str, ...]) -> tuple[int, ...]:
    if len(sources) == 1:
        return shapes[sources[0]]
    first = shapes[sources[0]]
    return (sum(shapes[s][0] for s in sources), *first[1:])


_FIX_DOWNLOAD = "The file is damaged or not a Z-Image transformer: download z_image_turbo_bf16.safetensors again."


def _block_counts(names: Iterable[str], path: object) -> dict[str, int]:
    """Blocks per group, numbered 0..n-1 without gaps and at most MAX_LAYERS: checked on key names
    alone, before any model is built (a key `layers.9999999.…` must not size a skeleton)."""
    names = list(names)
    with checkpoint_errors(path, WHAT, _FIX_DOWNLOAD):
        return {group: numbered_blocks(names, group + ".", group, max_count=MAX_LAYERS)
                for group in ("layers", "noise_refiner", "context_refiner", "siglip_refiner")}


def _default_axes(head_dim: int) -> tuple[int, int, int]:
    # Official split of head_dim 128 is 32/48/48 (1/4, 3/8, 3/8); keep every part even.
    a0 = 2 * round(head_dim / 8)
    a1 = 2 * ((head_dim - a0) // 4)
    return a0, a1, head_dim - a0 - a1


def _config_from_shapes(names: Mapping[str, tuple[int, ...]], path: object) -> TransformerConfig:
    counts = _block_counts(names, path)

    def need(key: str, ndim: int) -> tuple[int, ...]:
        if key not in names:
            raise CheckpointError(path, WHAT, f"no tensor {key!r} (an incomplete or different model)",
                                  "Download the complete transformer file again.")
        if len(names[key]) != ndim:
            raise CheckpointError(path, f"{WHAT} ({key} with {ndim} dimension(s))",
                                  f"{key} of shape {list(names[key])}", _FIX_DOWNLOAD)
        return names[key]

    dim, cap_feat_dim = need("cap_embedder.1.weight", 2)
    _, patch_dim = need("x_embedder.weight", 2)
    (head_dim,) = need("layers.0.attention.q_norm.weight", 1)
    in_channels = LATENT_CHANNELS
    patch = int(round((patch_dim / in_channels) ** 0.5))
    if patch * patch * in_channels != patch_dim or head_dim <= 0 or dim % head_dim:
        raise CheckpointError(path, WHAT, f"inconsistent shapes (x_embedder in {patch_dim}, dim {dim}, "
                              f"head_dim {head_dim})", "The file is not a Z-Image transformer.")
    if counts["noise_refiner"] != counts["context_refiner"]:
        raise CheckpointError(path, f"{WHAT} with as many context_refiner as noise_refiner blocks",
                              f"{counts['noise_refiner']} noise_refiner and {counts['context_refiner']} "
                              "context_refiner blocks", _FIX_DOWNLOAD)
    # Omni checkpoints add a SigLIP embedder (RMSNorm + Linear siglip_feat_dim -> dim) and refiner.
    siglip_feat_dim = need("siglip_embedder.1.weight", 2)[1] if "siglip_embedder.1.weight" in names else None
    if siglip_feat_dim is not None and counts["siglip_refiner"] != counts["noise_refiner"]:
        raise CheckpointError(path, f"{WHAT} (Omni) with as many siglip_refiner as noise_refiner blocks",
                              f"{counts['noise_refiner']} noise_refiner and {counts['siglip_refiner']} "
                              "siglip_refiner blocks", _FIX_DOWNLOAD)
    n_heads = dim // head_dim
    # Shapes are bounded by the file's size only through their product (a [0, 10**12] tensor takes no
    # bytes), so the config built from them is range-checked like a config.json.
    with checkpoint_errors(path, WHAT, _FIX_DOWNLOAD):
        return TransformerConfig(
            dim=dim, n_layers=counts["layers"], n_refiner_layers=counts["noise_refiner"],
            n_heads=n_heads, n_kv_heads=n_heads, in_channels=in_channels, patch_size=patch,
            cap_feat_dim=cap_feat_dim, axes_dims=_default_axes(head_dim), siglip_feat_dim=siglip_feat_dim)


_JSON_WHAT = "a Z-Image transformer config.json"
_JSON_FIX = "Restore config.json from Tongyi-MAI/Z-Image-Turbo."


def _config_from_json(cfg: Mapping[str, Any], path: object) -> TransformerConfig:
    """TransformerConfig from a diffusers config.json; every value is type- and range-checked."""
    patch = cfg.get("all_patch_size", [2])
    if isinstance(patch, list):
        if len(patch) != 1:
            raise CheckpointError(path, f"{_JSON_WHAT} (all_patch_size a list of one whole number)",
                                  f"all_patch_size = {str(patch)[:80]}", _JSON_FIX)
        patch = patch[0]
    try:
        with checkpoint_errors(path, _JSON_WHAT, _JSON_FIX):
            return TransformerConfig(
                dim=cfg["dim"], n_layers=cfg["n_layers"], n_refiner_layers=cfg["n_refiner_layers"],
                n_heads=cfg["n_heads"], n_kv_heads=cfg.get("n_kv_heads", cfg["n_heads"]),
                in_channels=cfg.get("in_channels", 16), patch_size=patch, cap_feat_dim=cfg["cap_feat_dim"],
                axes_dims=cfg.get("axes_dims", (32, 48, 48)), axes_lens=cfg.get("axes_lens", (1536, 512, 512)),
                rope_theta=cfg.get("rope_theta", 256.0), norm_eps=cfg.get("norm_eps", 1e-5),
                t_scale=cfg.get("t_scale", 1000.0), siglip_feat_dim=cfg.get("siglip_feat_dim"))
    except KeyError as e:
        raise CheckpointError(path, f"{_JSON_WHAT} (dim, n_layers, n_heads, ...)", f"no {e} setting",
                              _JSON_FIX) from None
    except ValueError as e:  # consistency checks across values (dim % n_heads, axes_dims sum)
        if isinstance(e, BoundsError):
            raise
        raise CheckpointError(path, _JSON_WHAT, f"an unusable config ({e})", _JSON_FIX) from None


def infer_transformer_config(checkpoint: Checkpoint | Mapping[str, torch.Tensor]) -> TransformerConfig:
    """Config from `config.json` when the checkpoint has one, else from tensor shapes (ComfyUI file)."""
    path = getattr(checkpoint, "path", "<state dict>")
    shapes = _shapes_of(checkpoint)
    fmt = detect_transformer_format(shapes, path)
    plan = _plan(shapes, fmt)
    names = {name: _source_shape(shapes, src) for name, src in plan.items()}
    cfg_json = getattr(checkpoint, "config", None)
    if cfg_json:
        _block_counts(names, path)
        return _config_from_json(cfg_json, Path(path) / "config.json")
    return _config_from_shapes(names, path)


def transformer_quant_layers(path: str | os.PathLike) -> dict[str, dict]:
    """The ComfyUI mixed-precision ("comfy_quant") layers of a transformer file, by model layer name (e.g.
    "layers.0.attention.qkv" -> {"format": "float8_e4m3fn"}); empty for plain, fp8 and scaled_fp8 files
    and diffusers folders. Reads the header only."""
    with open_checkpoint(_transformer_folder(path), WHAT) as ckpt:
        check_gguf_architecture(ckpt)
        fmt = detect_transformer_format(ckpt.infos, ckpt.path)
        quant = quant_configs(ckpt, fmt.prefix) if fmt.kind == "comfy" else {}
        return {k: v for k, v in quant.items() if v.get("format") != GGUF_FORMAT}


# GGUF architectures a Z-Image transformer file may declare: ComfyUI-GGUF's converter names Z-Image (a
# Lumina 2 model to ComfyUI) "lumina2"; files from older tools have none. The tensors decide after that.
GGUF_ARCHITECTURES = (None, "lumina2")


def check_gguf_architecture(ckpt: Checkpoint) -> None:
    """A GGUF file that says it is another model (FLUX, SDXL, Qwen-Image, a language model, ...) is refused by
    its metadata, before its tensors are looked at."""
    if not isinstance(ckpt, GGUFCheckpoint) or ckpt.architecture in GGUF_ARCHITECTURES:
        return
    text = ckpt.architecture in ("qwen3", "llama", "qwen2", "qwen2vl", "qwen3vl", "qwen3moe", "t5", "t5encoder")
    fix = ("This is a text encoder: load Qwen3-4B GGUFs with the Z-Image text encoder loader." if text else
           "Load a Z-Image-Turbo GGUF (e.g. z_image_turbo-Q8_0.gguf) or z_image_turbo_bf16.safetensors.")
    raise CheckpointError(ckpt.path, f"{WHAT} (GGUF architecture 'lumina2')", describe_architecture(ckpt), fix)


def expected_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """ComfyUI key name -> shape for a config (built on the meta device, no memory used)."""
    model = ZImageTransformer(config, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# -- loading ------------------------------------------------------------------------------------------

def _storage_dtype(dtypes: Mapping[str, torch.dtype], plan: Mapping[str, tuple[str, ...]]) -> torch.dtype:
    # The big matmul weights decide; small tensors of mixed files are often kept in bf16/fp32.
    for name in ("layers.0.attention.qkv.weight", "x_embedder.weight"):
        if name in plan:
            return dtypes[plan[name][0]]
    return torch.bfloat16


def _self_loading(model: torch.nn.Module, expected: Mapping[str, tuple[int, ...]],
                  layer_loader: LayerLoader) -> dict[str, torch.nn.Module]:
    """The layers (by name) whose tensors `layer_loader` reads itself."""
    own = {}
    for name in expected:
        layer = name.rpartition(".")[0]
        if layer and layer not in own and layer_loader.handles(module := model.get_submodule(layer)):
            own[layer] = module
    return own


def _load_layer(ckpt: Checkpoint, prefix: str, layer: str, module: torch.nn.Module, layer_loader: LayerLoader,
                quant: dict | None, stored: Mapping[str, torch.dtype], device: torch.device | str) -> None:
    """Give one self-loading layer its tensors as stored (fp8 bytes viewed as fp8, scales as they are)."""
    tensors = {}
    for pname, _ in module.named_parameters(recurse=False):
        key = f"{prefix}{layer}.{pname}"
        t = ckpt.view(key)
        tensors[pname] = ckpt.owned((t.view(stored[key]) if t.dtype != stored[key] else t).to(device))
    if quant is not None:
        for suffix in QUANT_SIDE_SUFFIXES:
            if (key := f"{prefix}{layer}.{suffix}") in ckpt.infos:
                tensors[suffix] = ckpt.load(key, device=device)
    if "weight" not in tensors and (key := f"{prefix}{layer}.weight") in ckpt.infos:
        t = ckpt.view(key)  # a layer that creates its weight only when loading (ComfyUI's mixed Linear)
        tensors["weight"] = ckpt.owned((t.view(stored[key]) if t.dtype != stored[key] else t).to(device))
    try:
        layer_loader.load(module, layer, tensors, quant, device)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        fmt = (quant or {}).get("format", "unquantized")
        raise CheckpointError(ckpt.path, f"{WHAT} whose quantized layers this ComfyUI can read",
                              f"layer {layer} ({str(fmt)[:40]}): {str(e)[:200]}",
                              "Update ComfyUI for this quantization format, or load the bf16 file.") from e


def _transformer_folder(path: str | os.PathLike) -> Path:
    """A diffusers pipeline root (model_index.json, transformer/, vae/, ...) means its transformer/."""
    path = Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors*")) and (path / "transformer").is_dir():
        return path / "transformer"
    return path


@release_on_error
def load_transformer(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu", operations: Any = None,
                     quantize: str | None = None, mmap: bool = True,
                     check_interrupt: Callable[[], None] | None = None,
                     model_class: type[ZImageTransformer] = ZImageTransformer,
                     layer_loader: LayerLoader | None = None) -> ZImageTransformer:
    """Load a Z-Image transformer: ComfyUI single file (any prefix; bf16/fp16/fp32/fp8) or diffusers folder.

    `dtype` is the weight and compute dtype (default: the stored dtype; bf16 for fp8 files).
    `operations` is a namespace of layer classes (e.g. ComfyUI's `comfy.ops.manual_cast`).
    `quantize="fp8"` stores the block matmul weights as float8_e4m3fn with per-row scales after
    loading (fp8 tensor-core matmuls on Ada/Hopper GPUs, about half the weight memory).
    The weights are copied out of the file (one read each), so the model never depends on the file
    again; `mmap=False` reads with plain file reads instead of a memory map (ComfyUI's --disable-mmap).
    `check_interrupt` is called before each tensor is read; whatever it raises propagates and the
    partly loaded model is freed.
    `model_class`: a ZImageTransformer subclass to build (e.g. one with another call convention).
    `layer_loader`: layers of `operations` that read their own tensors (e.g. ComfyUI's mixed-precision
    Linear, which keeps a comfy_quant file's weights quantized); the file's checks are the same. Without
    it, quantized weights are dequantized into `dtype`.
    """
    if quantize not in (None, "fp8"):
        raise ValueError(f"load_transformer: quantize must be None or 'fp8', got {quantize!r}.")
    dtype = compute_dtype(dtype, "load_transformer: dtype", allow_fp8=True)
    with open_checkpoint(_transformer_folder(path), WHAT, mmap=mmap) as ckpt:
        return _load(ckpt, dtype, device, operations, quantize, check_interrupt, model_class, layer_loader)


def _load(ckpt: Checkpoint, dtype: torch.dtype | None, device: torch.device | str, operations: Any,
          quantize: str | None, check_interrupt: Callable[[], None] | None,
          model_class: type[ZImageTransformer], layer_loader: LayerLoader | None = None) -> ZImageTransformer:
    check_gguf_architecture(ckpt)
    shapes = _shapes_of(ckpt)
    fmt = detect_transformer_format(shapes, ckpt.path)
    plan = _plan(shapes, fmt)
    names = {name: _source_shape(shapes, src) for name, src in plan.items()}
    if ckpt.config:
        _block_counts(names, ckpt.path)
        config = _config_from_json(ckpt.config, Path(ckpt.path) / "config.json")
    else:
        config = _config_from_shapes(names, ckpt.path)

    expected = expected_shapes(config)
    missing = [k for k in expected if k not in names]
    if missing:
        missing = _missing_source_names(missing, fmt, shapes)
        few = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(ckpt.path, f"{WHAT} with all {len(expected)} tensors",
                              f"{len(missing)} missing tensor(s): {few}",
                              "The file is incomplete or a different model: download it again.")
    unexpected = [k for k in names if k not in expected]
    if unexpected:
        few = ", ".join(sorted(unexpected)[:5])
        raise CheckpointError(ckpt.path, f"{WHAT} with only Z-Image-Turbo tensors",
                              f"{len(unexpected)} unknown tensor(s): {few}",
                              "This looks like a different model variant; load z_image_turbo_bf16.safetensors.")
    # Layers that read their own tensors (ComfyUI file layout only: one stored tensor per parameter).
    keep = layer_loader.formats if layer_loader is not None and fmt.kind == "comfy" else frozenset()
    quant = quant_configs(ckpt, fmt.prefix) if keep else {}
    # Packed 4-bit weights (uint8, e.g. NVFP4) have their own shapes; their layers check them.
    packed = {k for k in expected if k.endswith(".weight") and ckpt.dtype(plan[k][0]) == torch.uint8
              and quant.get(k[: -len(".weight")], {}).get("format") in keep - {*FP8_FORMATS, GGUF_FORMAT}}
    wrong = [(k, expected[k], names[k]) for k in expected if tuple(names[k]) != expected[k] and k not in packed]
    if wrong:
        k, want, got = wrong[0]
        raise CheckpointError(ckpt.path, f"{WHAT} with consistent shapes ({k} {list(want)} for a model of "
                              f"dim {config.dim}, {config.n_heads} heads)",
                              f"{k} {list(got)} ({len(wrong)} tensor(s) with unexpected shapes)",
                              "The file is damaged or belongs to another model (or its config.json does not match).")
    # Integer/bool tensors are not weights; refused here, not later as a confusing compute error.
    layers = quant_layers(ckpt)
    stored = {src: stored_dtype(ckpt, src, layers, WHAT, _FIX_DOWNLOAD, keep) for name in expected
              for src in plan[name]}

    if dtype is None and ckpt.block_quant:
        dtype = torch.bfloat16  # GGUF weights dequantised at load: stored as the model computes
    if dtype is None:
        dtype = _storage_dtype(stored, plan)
        if dtype in FP8_DTYPES:
            dtype = torch.bfloat16  # fp8 files are computed in bf16
    if dtype in FP8_DTYPES and operations is None:
        raise ValueError("load_transformer: fp8 weights need weight-casting operations (ComfyUI's "
                         "comfy.ops.manual_cast); with plain torch.nn pass dtype=torch.bfloat16.")

    model = model_class(config, operations=operations, dtype=dtype, device="meta")
    own = _self_loading(model, expected, layer_loader) if keep else {}
    for name in expected:
        if check_interrupt is not None:
            check_interrupt()
        if name.rpartition(".")[0] not in own:
            set_param(ckpt, model, name, read_joined(ckpt, plan[name], stored, device), dtype=dtype, device=device)
    for layer, module in own.items():
        if check_interrupt is not None:
            check_interrupt()
        _load_layer(ckpt, fmt.prefix, layer, module, layer_loader, quant.get(layer), stored, device)  # type: ignore[arg-type]
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # a layer class that creates parameters we do not know about
        raise CheckpointError(ckpt.path, WHAT, f"no tensors for parameters {left[:5]}",
                              "The operations namespace adds parameters that Z-Image checkpoints do not have.")
    if quantize == "fp8":
        model.quantize_fp8()
    model.eval()
    return model
