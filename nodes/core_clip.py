"""Z-Image's Qwen3-4B text encoder as ComfyUI's core CLIP, with zimage_core's encoder inside.

`comfy.sd.CLIP` is built from a target whose model and tokenizer are ours: CLIPTextEncode, the
conditioning nodes and ComfyUI's model management work as with the native text encoder, and the
encoding is zimage_core's (no padding, CUDA graphs on the GPU). CONDITIONING has the native layout:
`[[features (1, L, 2560), {"pooled_output": None, "attention_mask": (1, L)}]]`.
"""

from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.ops
import comfy.sd
import torch

from ..zimage_core.accel.streaming import HostPinner
from .core_model import load_options
from .errors import load_explained
from .gguf import GGUFLayerLoader, gguf_operations, gguf_patcher_class

log = logging.getLogger(__name__)

TOKENS_KEY = "qwen3_4b"  # the key ComfyUI's own Z-Image tokenizer uses


def text_encoder_compute_dtype(device: torch.device, *, generating_from: torch.dtype | None = None) -> torch.dtype:
    """The one decision of the dtype Qwen3 computes in on `device`: for encoding, or for the prompt enhancer's
    generation with weights stored in `generating_from`.

    Encoding: float32 on every device, as ComfyUI's CLIP: its `SDClipModel.forward` runs the model with
    `dtype=torch.float32` through `comfy.ops.manual_cast` layers, each casting its weight (stored as the file
    has it, e.g. bf16) per call. `mm.text_encoder_dtype` (fp16) does not apply to Qwen3: native stores the file's
    dtype (`llama_detect`'s `dtype_llama` overrides it), and storage is not the compute dtype. float32 cannot
    overflow, so no fp16 NaN guard is needed.
    Generating: ComfyUI's own LLM generation (0.18.1 `BaseGenerate.generate`) computes in bf16 where
    `should_use_bf16(device)`, else float32. Not on the CPU with bf16 weights: there float32 means casting the
    whole model for every token (a bf16 2560x9728 matrix-vector product 2.5 ms, cast + float32 43 ms on a
    2-core EPYC), so generation computes in the weights' bf16, as before.
    """
    if generating_from is None:
        return torch.float32
    if mm.is_device_cpu(device):
        return generating_from if generating_from in (torch.bfloat16, torch.float32) else torch.float32
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


class ZImageClipTokenizer:
    """ComfyUI tokenizer interface over zimage_core's (chat template, 1504-token caption limit).

    Prompt-weight syntax such as "(cat:1.2)" is not parsed: Z-Image's encoder reads the text as written,
    and every token carries weight 1.0."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, llama_template: str | None = None,
                              **kwargs) -> dict:
        # llama_template: ComfyUI's own Z-Image tokenizer takes another template than the chat one this way
        # (TextEncodeZImageOmni's reference segments are encoded as written, with "{}").
        (ids,) = self.encoder.tokenize([text], template=llama_template)
        pairs = [(i, 1.0, 0) if return_word_ids else (i, 1.0) for i in ids]
        return {TOKENS_KEY: [pairs]}

    def untokenize(self, token_weight_pair: list) -> list:
        return [(t, self.encoder.tokenizer.decode([t[0]])) for t in token_weight_pair]

    def state_dict(self) -> dict:
        return {}


class ZImageClipModel(torch.nn.Module):
    """The CLIP's `cond_stage_model`: the Qwen3 layers (registered, so ComfyUI moves them) behind the
    interface `comfy.sd.CLIP` calls."""

    # comfy.sd.CLIP (0.18.2+) then gives it the classic patcher, not dynamic VRAM's: see comfy_compat.ClassicPatcher.
    disable_offload = True

    def __init__(self, encoder) -> None:
        super().__init__()
        self.transformer = encoder.model
        self.encoder = encoder
        self.dtypes = {encoder.dtype}
        # Set by ZImageCLIP.load_model: the GPU to stream the weights through for the next encode,
        # when they stay on the CPU because the GPU has no room for them.
        self.stream_device: torch.device | None = None
        self._pinner: HostPinner | None = None

    def pin_host_weights(self) -> None:
        """From now on, whenever the weights are (or come back) in CPU memory, page-lock them in the background:
        a later streamed encode then copies them at once instead of pinning 7.3 GiB inside the prompt."""
        if self._pinner is None:
            self._pinner = HostPinner(self)
        self._pinner.start()

    def wait_host_weights(self) -> None:
        """Called before anything moves or reads the weights: a background pin still running finishes first."""
        if self._pinner is not None:
            self._pinner.wait()
            if self._pinner.error is not None:
                log.warning("Z-Image text encoder: cannot page-lock its CPU weights (%s); streaming pins them per "
                            "encode instead.", self._pinner.error)
                self._pinner = None  # do not try again on every offload

    def _apply(self, fn, recurse=True):
        # Every whole-model move (`.to(device)` by ComfyUI's patcher, on load and offload) passes here.
        self.wait_host_weights()
        out = super()._apply(fn, recurse)
        if self._pinner is not None:
            self._pinner.start()  # back in CPU memory (an offload): pin while the diffusion model samples
        return out

    def reset_clip_options(self) -> None:
        pass

    def set_clip_options(self, options: dict) -> None:
        pass  # no CLIP skip / projection options: Z-Image always takes Qwen3's second-to-last layer

    def memory_estimation_function(self, tokens: dict, device=None) -> int:
        """Bytes beside the weights for encoding `tokens`: activations, which scale with the tokens actually
        encoded, and one weight cast to the compute dtype (manual cast: one layer's at a time)."""
        n = sum(len(chunk) for chunk in tokens.get(TOKENS_KEY, [])) or 1
        cfg = self.transformer.config
        size = mm.dtype_size(self.encoder.working_dtype)
        cast = 0 if self.encoder.working_dtype == self.encoder.dtype else cfg.hidden_size * cfg.intermediate_size * size
        return n * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * size * 2 + cast

    def encode_token_weights(self, tokens: dict):
        chunks = tokens.get(TOKENS_KEY)
        if not chunks:
            raise ValueError("Z-Image text encoder: these tokens come from another model's tokenizer. Encode the "
                             "prompt with the CLIP from ZImageTextEncoderLoader (or CLIPLoader type lumina2).")
        ids = [t[0] for chunk in chunks for t in chunk]
        self.wait_host_weights()
        (features,) = self._encode(ids)
        cond = features.unsqueeze(0).to(mm.intermediate_device(), torch.float32)
        mask = torch.ones(cond.shape[:2], dtype=torch.long, device=cond.device)
        return cond, None, {"attention_mask": mask}


    def _encode(self, ids: list[int]) -> list[torch.Tensor]:
        device = self.stream_device
        if device is None:
            return self.encoder.encode_ids([ids])
        # Only for this encode: between prompts the weights are ordinary (pinned) CPU tensors again,
        # which ComfyUI may load or offload as usual.
        home = self.encoder.device
        try:
            self.encoder.stream_weights(device)
        except RuntimeError as exc:  # pinning can fail on hosts short of page-locked memory
            log.warning("Z-Image text encoder: cannot stream from pinned memory (%s); encoding on %s.",
                               exc, home)
            self.stream_device = None
            self.encoder.stop_streaming(home)
            return self.encoder.encode_ids([ids])
        try:
            return self.encoder.encode_ids([ids])
        finally:
            self.encoder.stop_streaming(home)


class ZImageCLIP(comfy.sd.CLIP):
    """comfy.sd.CLIP that does not evict the diffusion model to encode a prompt.

    ComfyUI loads a text encoder onto the GPU before every encode, unloading whatever is in the way. With
    Z-Image's 7.3 GiB encoder beside the 11.5 GiB transformer on a 16 GB card that means both reload for
    every new prompt (seconds each time). When the encoder does not fit into the memory that is free
    without unloading anything, its weights stay in CPU memory: on a GPU they are streamed through it
    layer by layer from pinned memory (copies overlapped with compute, two layers resident), elsewhere
    the CPU encodes."""

    def load_model(self, *args, **kwargs):
        patcher = self.patcher
        device = patcher.load_device
        to_move = patcher.model_size() - patcher.loaded_size()
        model = self.cond_stage_model
        model.wait_host_weights()
        model.stream_device = None
        if mm.is_device_cpu(device) or to_move <= 0:
            return super().load_model(*args, **kwargs)  # nothing to move
        tokens = args[0] if args else kwargs.get("tokens", {})
        activations = model.memory_estimation_function(tokens or {})
        free = mm.get_free_memory(device)
        if free >= to_move + activations + mm.minimum_inference_memory():
            return super().load_model(*args, **kwargs)
        if patcher.loaded_size() == 0 and device.type == "cuda" and free >= self._stream_room(activations):
            model.stream_device = device
        # Otherwise encode where the weights are: the CPU, or split (comfy.ops layers cast the offloaded part).
        return patcher

    def _stream_room(self, activations: int) -> int:
        """GPU bytes streaming needs: two decoder layers and the activations."""
        enc = self.cond_stage_model.encoder
        layer = sum(p.numel() * p.element_size() for p in enc.model.layers[0].parameters())
        return 2 * layer + activations + mm.minimum_inference_memory()

    def clone(self, *args, **kwargs):
        clone = super().clone(*args, **kwargs)
        clone.__class__ = ZImageCLIP
        return clone


class _Target:
    """What `comfy.sd.CLIP(target=...)` reads: the model and tokenizer constructors and their params."""

    def __init__(self, encoder) -> None:
        self.params: dict = {}
        self._encoder = encoder

    def clip(self, **params) -> ZImageClipModel:
        return ZImageClipModel(self._encoder)

    def tokenizer(self, embedding_directory=None, tokenizer_data=None, **kwargs) -> ZImageClipTokenizer:
        return ZImageClipTokenizer(self._encoder)


def load_zimage_clip(path: str) -> comfy.sd.CLIP:
    from ..zimage_core.text_encoder import load_text_encoder

    load_device = mm.text_encoder_device()
    offload_device = mm.text_encoder_offload_device()
    # Stored as the file has it (fp8 files dequantized to bf16), computed as ComfyUI computes it: manual_cast
    # layers cast each weight to the compute dtype per call, as native CLIPLoader's do.
    from ..zimage_core.checkpoint.gguf import is_gguf

    operations, layer_loader = comfy.ops.manual_cast, None
    if is_gguf(path):  # block-quantised weights stay quantised, dequantised per layer per call (nodes.gguf)
        operations = gguf_operations(comfy.ops.manual_cast)
        layer_loader = GGUFLayerLoader(operations, torch.float32)
    encoder = load_explained(
        lambda: load_text_encoder(path, device=offload_device, operations=operations,
                                  compute_dtype=text_encoder_compute_dtype(load_device), layer_loader=layer_loader,
                                  **load_options()),
        path,
        "the Qwen3-4B text encoder of Z-Image (qwen_3_4b.safetensors)",
        "Put qwen_3_4b.safetensors in models/text_encoders and select it.")
    encoder.model.eval().requires_grad_(False)
    options = {"load_device": load_device, "offload_device": offload_device, "initial_device": offload_device,
               "dtype": encoder.dtype}
    clip = ZImageCLIP(target=_Target(encoder), model_options=options)
    if layer_loader is not None:  # LoRA patches on quantised weights: applied to the dequantised weight
        clip.patcher.__class__ = gguf_patcher_class(type(clip.patcher))
    if _pin_host(load_device, offload_device, clip.patcher.model_size()):
        clip.cond_stage_model.pin_host_weights()
    return clip


def _pin_host(load_device: torch.device, offload_device: torch.device, size: int) -> bool:
    """Page-lock the encoder's CPU weights (in the background) when a GPU may stream them: the load device is a
    CUDA GPU, the weights live in CPU memory between prompts, and the host has room to spare for it."""
    if load_device.type != "cuda" or offload_device.type != "cpu":
        return False
    try:
        import psutil
        return psutil.virtual_memory().available > 2 * size
    except Exception:  # noqa: BLE001 - psutil missing or unreadable: do not pin blind
        return False

