"""Reading GGUF files (llama.cpp's format, used by ComfyUI-GGUF for diffusion models and text encoders).

The header is parsed here with hard bounds before anything is trusted (the `gguf` package's reader maps the
whole file and believes every count, so a hostile count means minutes of parsing or gigabytes of memory):
counts of tensors and metadata entries, string and array lengths, dimensions and sizes are each checked
against a limit and against the bytes left in the file, so a truncated, lying or foreign file fails with a
`CheckpointError` naming the file (and tensor) after reading only its header. The format's constants (value
types, quantisation type names and block sizes) come from the `gguf` package.

A GGUF file opens as a `GGUFCheckpoint`: the same lazy key -> tensor view as a safetensors `Checkpoint`,
where each tensor's shape is the model's (GGUF lists dimensions fastest first; ComfyUI-GGUF's
`comfy.gguf.orig_shape.*` entries restore shapes it had to flatten). Float tensors (F32/F16/BF16) read as
those dtypes; block-quantised ones (`block_quant`: key -> type name) read as their raw bytes, one row of
blocks per row of the tensor, for layers that keep them quantised, or dequantised by `dequantized`.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import CheckpointError
from .gguf_quants import BLOCK_SIZES, FLOAT_TYPES, TYPE_IDS, packed_bytes
from .gguf_quants import dequantize as dequantize_raw
from .io import Checkpoint, TensorInfo, _read_exact, open_regular

GGUF_MAGIC = b"GGUF"
MAX_TENSORS = 1 << 16  # Z-Image's transformer has 453, Qwen3-4B 398
MAX_KV = 1 << 16
MAX_NAME = 1024  # bytes in a tensor name or metadata key
MAX_STRING = 1 << 24  # bytes in one metadata string (a chat template is a few KB)
MAX_HEADER = 256 << 20  # everything before the tensor data (a 150k-token vocabulary is ~10 MB)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DIM = 1 << 40
MAX_SMALL_ARRAY = 64  # numeric arrays this short are kept (e.g. comfy.gguf.orig_shape.*); longer are skipped
_READ_CHUNK = 1 << 20
FIX_DOWNLOAD = "The download is incomplete or damaged: download the file again."

# GGUF metadata value types: (struct format, size) of the scalars; 8 = string, 9 = array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is meant as a GGUF file: named *.gguf, or a regular file that starts with the GGUF magic
    (reads 4 bytes; False on any error). A damaged .gguf file then gets the GGUF reader's error."""
    if Path(path).suffix.lower() == ".gguf":
        return True
    try:
        fd = open_regular(path, "a model file")
    except CheckpointError:
        return False
    try:
        return os.read(fd, 4) == GGUF_MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def type_name(type_id: int) -> str:
    """A GGML type id's name (the `gguf` package's), e.g. 23 -> "IQ4_XS"."""
    import gguf

    try:
        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type id {type_id}"


def _check_constants() -> None:
    """Our block table must be the format's (the `gguf` package's GGML_QUANT_SIZES)."""
    import gguf

    for type_id, name in TYPE_IDS.items():
        qtype = gguf.GGMLQuantizationType(type_id)
        if qtype.name != name or tuple(gguf.GGML_QUANT_SIZES[qtype]) != BLOCK_SIZES[name]:
            raise RuntimeError(f"gguf package disagrees on GGML type {type_id} ({name}): update zimage_core.")


class _Reader:
    """Bounded sequential reads of a GGUF header from a file descriptor (read in chunks, never mapped)."""

    def __init__(self, fd: int, size: int, path: Path, what: str) -> None:
        self.fd, self.size, self.path, self.what = fd, size, path, what
        self.buf = bytearray()
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # file offset of the next read

    def fail(self, found: str, fix: str = FIX_DOWNLOAD) -> CheckpointError:
        return CheckpointError(self.path, f"{self.what} in GGUF format", found, fix)

    def take(self, n: int, context: str) -> bytes:
        end = self.pos + n
        if n < 0 or end > self.size:
            raise self.fail(f"a truncated file ({self.size} bytes; {context} runs past the end)")
        if end > MAX_HEADER:
            raise self.fail(f"a header larger than {MAX_HEADER >> 20} MiB ({context})",
                            "This is not a model file we can read.")
        if end > self.base + len(self.buf):
            keep = self.buf[self.pos - self.base:]
            want = max(end - self.pos, _READ_CHUNK)
            want = min(want, self.size - self.pos)
            more = bytearray(want - len(keep))
            _read_exact(self.fd, self.pos + len(keep), memoryview(more), self.path, self.what)
            self.buf = keep + more
            self.base = self.pos
        out = bytes(self.buf[self.pos - self.base:end - self.base])
        self.pos = end
        return out

    def skip(self, n: int, context: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"a truncated file ({self.size} bytes; {context} runs past the end)")
        if self.pos + n <= self.base + len(self.buf):
            self.pos += n
        else:
            self.buf, self.base, self.pos = bytearray(), self.pos + n, self.pos + n

    def scalar(self, fmt: str, size: int, context: str):
        return struct.unpack(fmt, self.take(size, context))[0]

    def u32(self, context: str) -> int:
        return self.scalar("<I", 4, context)

    def u64(self, context: str) -> int:
        return self.scalar("<Q", 8, context)

    def string(self, context: str, limit: int = MAX_STRING) -> str:
        n = self.u64(context)
        if n > limit:
            raise self.fail(f"{context} of {n} bytes (at most {limit})", "This is not a model file we can read.")
        return self.take(n, context).decode("utf-8", errors="replace")

    def value(self, vtype: int, context: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype], context)
        if vtype == _STRING:
            return self.string(context)
        if vtype != _ARRAY or depth > 1:
            raise self.fail(f"{context} of unknown value type {vtype}", "This is not a GGUF file we can read.")
        etype, count = self.u32(context), self.u64(context)
        if etype in _SCALARS:
            size = _SCALARS[etype][1]
            if count > (self.size - self.pos) // size:
                raise self.fail(f"a truncated file ({context}: {count} values past the end)")
            if count <= MAX_SMALL_ARRAY:
                return [self.scalar(_SCALARS[etype][0], size, context) for _ in range(count)]
            self.skip(count * size, context)
            return None
        if etype not in (_STRING, _ARRAY) or count > (self.size - self.pos) // 8:
            raise self.fail(f"{context}: an array of {count} values of type {etype}")
        for _ in range(count):  # strings (e.g. a tokenizer's vocabulary): skipped, each by its length
            if etype == _STRING:
                self.skip(self.u64(context), context)
            else:
                self.value(_ARRAY, context, depth + 1)
        return None


class GGUFCheckpoint(Checkpoint):
    """A GGUF file as a `Checkpoint`: `infos` (model shapes; uint8 for block-quantised tensors), `block_quant`
    (key -> GGML type name of each block-quantised tensor), `fields` (the metadata's scalars, strings and short
    numeric arrays) and `architecture` (general.architecture, or None)."""

    FILE_KIND = "a GGUF file"

    def __init__(self, path: Path, infos: dict[str, TensorInfo], block_quant: dict[str, str], fields: dict,
                 *, mmap: bool = True) -> None:
        super().__init__(path, infos, {}, None, mmap=mmap)
        self.block_quant = block_quant
        self.fields = fields
        arch = fields.get("general.architecture")
        self.architecture = arch if isinstance(arch, str) else None

    def view(self, key: str) -> torch.Tensor:
        """Float tensors as `Checkpoint.view`; block-quantised ones as their bytes (uint8, one row of blocks per
        row of the tensor: shape (rows, bytes per row))."""
        qtype = self.block_quant.get(key)
        if qtype is None:
            return super().view(key)
        info = self.infos[key]
        rows = 1
        for d in info.shape[:-1]:
            rows *= d
        return self._bytes(info).reshape(rows, -1)

    def dequantized(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """A block-quantised tensor in float32 on `device` (memory of its own); None for other tensors."""
        qtype = self.block_quant.get(key)
        if qtype is None:
            return None
        return dequantize_raw(self.view(key).to(device), qtype, self.infos[key].shape)

    def renamed(self, rename: Callable[[str], str | None]) -> GGUFCheckpoint:
        """The same file with each key `rename(key)` (None: left out), e.g. llama.cpp names -> HF names."""
        infos, quant = {}, {}
        for key, info in self.infos.items():
            new = rename(key)
            if new is None:
                continue
            infos[new] = info
            if key in self.block_quant:
                quant[new] = self.block_quant[key]
        out = GGUFCheckpoint(self.path, infos, quant, self.fields, mmap=self.mmap)
        out.config = self.config
        out._files, out._maps = self._files, self._maps  # one open file: closing either closes it
        return out


def open_gguf(path: str | os.PathLike, what: str, *, mmap: bool = True) -> GGUFCheckpoint:
    """Open a GGUF file (header read and checked; no tensor data read). `what` names the expected model."""
    _check_constants()
    path = Path(path)
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        r = _Reader(fd, size, path, what)
        try:
            header = r.take(24, "the header") if size >= 24 else None
        except CheckpointError:
            header = None
        if header is None or header[:4] != GGUF_MAGIC:
            raise CheckpointError(path, f"{what} in GGUF format", f"a {size}-byte file without the GGUF magic",
                                  "The file is damaged or not GGUF: download it again, or choose a .safetensors "
                                  "file.")
        version, n_tensors, n_kv = struct.unpack("<IQQ", header[4:])
        if version not in (2, 3):
            swapped = struct.unpack(">I", header[4:8])[0]
            found = ("a big-endian GGUF file" if swapped in (2, 3) else f"GGUF version {version}")
            raise r.fail(found, "Use a little-endian GGUF file of version 2 or 3 (what llama.cpp and "
                                "ComfyUI-GGUF write).")
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise r.fail(f"a header that claims {n_tensors} tensors and {n_kv} metadata entries (at most "
                         f"{MAX_TENSORS} each)", "This is not a model file we can read.")
        fields: dict = {}
        for i in range(n_kv):
            key = r.string(f"metadata key {i}", MAX_NAME)
            vtype = r.u32(f"metadata {key[:80]!r}")
            value = r.value(vtype, f"metadata {key[:80]!r}")
            if value is not None:
                fields[key] = value
        raw_tensors = []
        for i in range(n_tensors):
            name = r.string(f"the name of tensor {i}", MAX_NAME)
            n_dims = r.u32(f"tensor {name[:80]!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise r.fail(f"tensor {name[:80]!r} with {n_dims} dimensions (1 to {MAX_DIMS})")
            dims = struct.unpack(f"<{n_dims}Q", r.take(8 * n_dims, f"tensor {name[:80]!r}"))
            type_id = r.u32(f"tensor {name[:80]!r}")
            offset = r.u64(f"tensor {name[:80]!r}")
            raw_tensors.append((name, dims, type_id, offset))
        alignment = fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= 1 << 16 \
                or alignment & (alignment - 1):
            raise r.fail(f"general.alignment = {str(alignment)[:40]} (a power of two)")
        data_start = -(-r.pos // alignment) * alignment
    finally:
        os.close(fd)

    infos: dict[str, TensorInfo] = {}
    block_quant: dict[str, str] = {}
    for name, dims, type_id, offset in raw_tensors:
        if name in infos:
            raise CheckpointError(path, f"{what} in GGUF format", f"tensor {name[:80]!r} listed twice", FIX_DOWNLOAD)
        qtype = TYPE_IDS.get(type_id)
        if qtype is None:
            raise CheckpointError(path, f"{what} in GGUF format with F32/F16/BF16/Q8_0/Q6_K/Q5_K/Q4_K/Q3_K/Q2_K/"
                                  "Q5_1/Q5_0/Q4_1/Q4_0 tensors",
                                  f"tensor {name[:80]!r} of type {type_name(type_id)}",
                                  "This quantisation is not supported: choose a Q8_0, Q6_K, Q5_K_M, Q4_K_M or "
                                  "Q3_K_M file.")
        if any(not 1 <= d <= MAX_DIM for d in dims) or math.prod(dims) > MAX_DIM:
            raise CheckpointError(path, f"{what} in GGUF format", f"tensor {name[:80]!r} with dimensions "
                                  f"{list(dims)[:8]}", FIX_DOWNLOAD)
        elems = BLOCK_SIZES[qtype][0]
        if dims[0] % elems:
            raise CheckpointError(path, f"{what} in GGUF format", f"tensor {name[:80]!r} of type {qtype} with "
                                  f"rows of {dims[0]} values (not whole blocks of {elems})", FIX_DOWNLOAD)
        shape = tuple(reversed(dims))
        orig = fields.get(f"comfy.gguf.orig_shape.{name}")
        if orig is not None:
            if (not isinstance(orig, list) or not 1 <= len(orig) <= 8 or any(
                    isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DIM for d in orig)
                    or math.prod(orig) != math.prod(dims)):
                raise CheckpointError(path, f"{what} in GGUF format", f"comfy.gguf.orig_shape.{name[:80]} = "
                                      f"{str(orig)[:80]} for a tensor of {math.prod(dims)} values", FIX_DOWNLOAD)
            if qtype not in FLOAT_TYPES and orig[-1] != dims[0]:
                raise CheckpointError(path, f"{what} in GGUF format", f"tensor {name[:80]!r}: a {qtype} tensor "
                                      "whose original shape splits its rows", FIX_DOWNLOAD)
            shape = tuple(orig)
        nbytes = packed_bytes(qtype, dims)
        if offset % alignment:
            raise CheckpointError(path, f"{what} in GGUF format", f"tensor {name[:80]!r} at an offset not aligned to "
                                  f"{alignment} bytes", FIX_DOWNLOAD)
        begin = data_start + offset
        if begin + nbytes > size:
            raise CheckpointError(path, what, f"a truncated file ({size} bytes; tensor {name[:80]!r} ends past "
                                  "the end)", FIX_DOWNLOAD)
        dtype = FLOAT_TYPES.get(qtype, torch.uint8)
        infos[name] = TensorInfo(shape, dtype, path, begin, begin + nbytes)
        if qtype not in FLOAT_TYPES:
            block_quant[name] = qtype
    if not infos:
        raise CheckpointError(path, what, "a GGUF file with no tensors", FIX_DOWNLOAD)
    return GGUFCheckpoint(path, infos, block_quant, fields, mmap=mmap)


# -- key names ----------------------------------------------------------------------------------------

# llama.cpp's tensor names of a Qwen3 (and Llama-family) model -> Hugging Face names (Qwen3ForCausalLM).
# llama.cpp permutes the q/k rows of Llama models only (LlamaModel.permute for its rotary layout); its
# Qwen2/Qwen3 converters write q/k as Hugging Face has them, so nothing is permuted back here.
_LLAMA_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LLAMA_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name_from_llama_cpp(key: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`, `token_embd.weight` ->
    `model.embed_tokens.weight`; `rope_freqs` (computed, not loaded) -> None; other names unchanged."""
    stem, dot, param = key.rpartition(".")
    if not dot:
        return key
    if stem == "rope_freqs":
        return None
    if stem in _LLAMA_TOP_NAMES:
        return f"{_LLAMA_TOP_NAMES[stem]}.{param}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LLAMA_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LLAMA_LAYER_NAMES[parts[2]]}.{param}"
    return key


# What general.architecture says about a file, for messages (ComfyUI-GGUF's and llama.cpp's names).
_ARCH_NAMES = {
    "flux": "a FLUX transformer", "sd1": "a Stable Diffusion 1.x UNet", "sdxl": "an SDXL UNet",
    "sd3": "a Stable Diffusion 3 transformer", "aura": "an AuraFlow transformer", "hidream": "a HiDream transformer",
    "cosmos": "a Cosmos transformer", "ltxv": "an LTX-Video transformer", "hyvid": "a HunyuanVideo transformer",
    "wan": "a Wan video transformer", "qwen_image": "a Qwen-Image transformer",
    "lumina2": "a Lumina 2 / Z-Image transformer", "t5": "a T5 text encoder", "t5encoder": "a T5 text encoder",
    "llama": "a Llama-family language model", "qwen2": "a Qwen2/Qwen2.5 language model",
    "qwen2vl": "a Qwen2.5-VL language model (Qwen-Image's text encoder)", "qwen3": "a Qwen3 language model",
    "qwen3moe": "a Qwen3 mixture-of-experts language model", "qwen3vl": "a Qwen3-VL language model",
    "gemma2": "a Gemma 2 language model", "gemma3": "a Gemma 3 language model",
}


def describe_architecture(ckpt: GGUFCheckpoint) -> str:
    arch = ckpt.architecture
    if arch is None:
        return "a GGUF file without general.architecture"
    return f"{_ARCH_NAMES.get(arch, 'a model')} (GGUF architecture {arch[:40]!r})"


def llama_cpp_name_from_hf(key: str) -> str:
    """The inverse of `hf_name_from_llama_cpp` (for writing GGUF text encoders, e.g. the demo file)."""
    top = {f"{v}.": f"{k}." for k, v in _LLAMA_TOP_NAMES.items()}
    for old, new in top.items():
        if key.startswith(old):
            return new + key[len(old):]
    parts = key.split(".")
    module = ".".join(parts[3:-1])
    layer = {v: k for k, v in _LLAMA_LAYER_NAMES.items()}.get(module)
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and layer is not None:
        return f"blk.{parts[2]}.{layer}.{parts[-1]}"
    return key


def write_gguf(path: str | os.PathLike, tensors: dict[str, torch.Tensor], architecture: str,
               fields: dict[str, str | int | float] | None = None) -> Path:
    """Write `tensors` as a GGUF file with the `gguf` package: matrices whose rows are whole 32-value blocks in
    Q8_0 (the package's quantiser), everything else F32 (as ComfyUI-GGUF's Q8_0 files). For demo files."""
    import gguf
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), architecture)
    for key, value in (fields or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))
    for key, tensor in tensors.items():
        value = np.ascontiguousarray(tensor.detach().to(torch.float32).cpu().numpy())
        if value.ndim >= 2 and value.shape[-1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            data = gguf.quants.quantize(value, q8)
            writer.add_tensor(key, data, raw_shape=data.shape, raw_dtype=q8)
        else:
            writer.add_tensor(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path
