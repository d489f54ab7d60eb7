"""GGUF reading without ComfyUI: dequantisation against the format's reference (the `gguf` package's numpy
`gguf.quants.dequantize`) bit for bit, the loaders' key names and architecture checks, and hostile files
(each a fast CheckpointError naming the file, in a memory-capped child where it could exhaust memory)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.gguf_fixtures import (
    ALL_TYPES,
    QUANTIZABLE,
    encode,
    q4_k_m_like,
    qtype,
    random_blocks,
    reference,
    write_gguf,
)
from tests.limited_child import run_limited
from tests.text_fixtures import qtc_tokenizer_dir
from tests.transformer_fixtures import make_diffusers_model, to_comfy
from zimage_core import CheckpointError, load_text_encoder, load_transformer
from zimage_core.checkpoint.gguf_quants import dequantize

gguf = pytest.importorskip("gguf")
FAST = 3.0


FLOATS = ("F32", "F16", "BF16")
CASES = [(n, "quantised") for n in ALL_TYPES if n in QUANTIZABLE] + [(n, "random") for n in ALL_TYPES if n not in FLOATS]


@pytest.mark.parametrize("name,source", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_dequantisation_is_the_reference_bit_for_bit(name, source, seed):
    """What the package's quantiser writes (where it has one) and random valid blocks (every block type)."""
    rng = np.random.default_rng(seed)
    elems = gguf.GGML_QUANT_SIZES[qtype(name)][0]
    shape = (5, max(elems, 32) * 3)
    value = rng.standard_normal(shape).astype(np.float32) * 0.1
    stored = encode(value, name, rng) if source == "quantised" else random_blocks(name, shape, rng)
    expected = reference(stored, name, shape)
    raw = torch.from_numpy(np.ascontiguousarray(stored).view(np.uint8).copy())
    got = dequantize(raw, name, shape)
    assert got.dtype == torch.float32 and got.shape == shape
    assert np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32)), name
    assert dequantize(raw, name, shape, torch.bfloat16).equal(torch.from_numpy(expected).to(torch.bfloat16))


def _transformer_file(tmp_path: Path, arch: str | None = "lumina2", prefix: str = "") -> tuple[Path, dict]:
    model = make_diffusers_model(seed=1)
    sd = to_comfy({k: v.detach() for k, v in model.state_dict().items()}, prefix=prefix, stray_norm_final=False)
    types = {k: q4_k_m_like(k, tuple(v.shape)) for k, v in sd.items()}
    ref = write_gguf(tmp_path / "dit.gguf", {k: v.numpy() for k, v in sd.items()}, types, arch=arch)
    return tmp_path / "dit.gguf", ref


@pytest.mark.parametrize("arch,prefix", [("lumina2", ""), (None, "model.diffusion_model.")])
def test_transformer_gguf_loads_its_dequantised_weights(tmp_path, arch, prefix):
    path, ref = _transformer_file(tmp_path, arch, prefix)
    model = load_transformer(path, dtype=torch.float32)
    sd = model.state_dict()
    for key, value in ref.items():
        assert torch.equal(sd[key[len(prefix):]], torch.from_numpy(value)), key


def _qwen3_gguf(path: Path, arch: str = "qwen3", fields: dict | None = None) -> None:
    from tests.text_fixtures import tiny_causal_lm

    lm = tiny_causal_lm(seed=1, vocab_size=151936)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    tensors = {}
    for key, value in lm.state_dict().items():
        if key == "lm_head.weight":
            continue
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        else:
            parts = key.split(".")
            name = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.weight"
        tensors[name] = value.detach().float().numpy()
    write_gguf(path, tensors, {k: q4_k_m_like(k, v.shape) for k, v in tensors.items()}, arch=arch,
               fields=fields or {})
    return lm


def test_qwen3_gguf_uses_llama_cpp_names_unpermuted(tmp_path):
    """q/k rows as Hugging Face has them (llama.cpp permutes only Llama's): the q_proj read back equals the
    package's dequantisation of the bytes written for blk.0.attn_q without any reordering."""
    path = tmp_path / "te.gguf"
    _qwen3_gguf(path)
    encoder = load_text_encoder(path, tokenizer=qtc_tokenizer_dir(), dtype=torch.float32)
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    expected = reference(np.asarray(t.data), t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)))
    got = encoder.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(got, torch.from_numpy(expected))


# -- hostile files ---------------------------------------------------------------------------------------

def _patched(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(src.read_bytes())
    raw[offset:offset + len(data)] = data
    dst.write_bytes(bytes(raw))
    return dst


def _first_tensor_info_offset(path: Path) -> int:
    """Byte offset of the first tensor's name length (after the metadata), found by the package's reader."""
    reader = gguf.GGUFReader(str(path))
    return int(reader.tensors[0].field.offset)


def _expect(fn, path: Path, *needles: str) -> None:
    import time

    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        fn()
    assert time.perf_counter() - start < FAST
    message = str(info.value)
    assert str(path) in message and all(n in message for n in needles), message


def test_hostile_gguf_files_fail_fast_with_a_clear_error(tmp_path):
    good, _ = _transformer_file(tmp_path)
    size = good.stat().st_size
    data = good.read_bytes()
    cases = {}
    (tmp_path / "short.gguf").write_bytes(data[:100])
    cases["short"] = (tmp_path / "short.gguf", ("truncated",))
    (tmp_path / "cut.gguf").write_bytes(data[: size - 1000])
    cases["cut"] = (tmp_path / "cut.gguf", ("truncated", "ends past the end"))
    cases["magic"] = (_patched(good, tmp_path / "magic.safetensors.gguf", 0, b"GGUX"), ("without the GGUF magic",))
    cases["version"] = (_patched(good, tmp_path / "version.gguf", 4, struct.pack("<I", 7)), ("GGUF version 7",))
    cases["big_endian"] = (_patched(good, tmp_path / "be.gguf", 4, struct.pack(">I", 3)), ("big-endian",))
    cases["tensors"] = (_patched(good, tmp_path / "count.gguf", 8, struct.pack("<Q", 1 << 60)), ("claims",))
    cases["kv"] = (_patched(good, tmp_path / "kv.gguf", 16, struct.pack("<Q", 1 << 62)), ("claims",))
    cases["key_len"] = (_patched(good, tmp_path / "key.gguf", 24, struct.pack("<Q", 1 << 50)), ("metadata key 0",))
    at = _first_tensor_info_offset(good)
    name_len = struct.unpack("<Q", data[at:at + 8])[0]
    dims_at = at + 8 + name_len
    cases["n_dims"] = (_patched(good, tmp_path / "ndims.gguf", dims_at, struct.pack("<I", 99)), ("99 dimensions",))
    cases["dim"] = (_patched(good, tmp_path / "dim.gguf", dims_at + 4, struct.pack("<Q", 1 << 62)), ("dimensions",))
    n_dims = struct.unpack("<I", data[dims_at:dims_at + 4])[0]
    type_at = dims_at + 4 + 8 * n_dims
    cases["qtype"] = (_patched(good, tmp_path / "type.gguf", type_at, struct.pack("<I", 23)), ("IQ4_XS",))
    cases["qtype_unknown"] = (_patched(good, tmp_path / "type2.gguf", type_at, struct.pack("<I", 9999)),
                              ("type id 9999",))
    cases["offset"] = (_patched(good, tmp_path / "off.gguf", type_at + 4, struct.pack("<Q", 1 << 40)),
                       ("truncated",))
    result = run_limited("\n".join(
        [f"r{i} = attempt(lambda: load_transformer({str(p)!r}))" for i, (p, _) in enumerate(cases.values())]
        + ["report(" + ", ".join(f"r{i}=r{i}" for i in range(len(cases))) + ")"]),
        imports="from zimage_core import load_transformer", extra_bytes=1 << 30)
    assert result["status"] == "ok", result
    for i, (name, (path, needles)) in enumerate(cases.items()):
        r = result[f"r{i}"]
        assert not r["ok"] and r["type"] == "CheckpointError", (name, r)
        assert r["seconds"] < FAST and str(path) in r["message"], (name, r)
        assert all(n in r["message"] for n in needles), (name, r["message"])


@pytest.mark.parametrize("arch,found", [("flux", "FLUX"), ("sdxl", "SDXL"), ("qwen_image", "Qwen-Image"),
                                        ("qwen3", "text encoder")])
def test_gguf_of_another_model_is_named_for_the_transformer_loader(tmp_path, arch, found):
    tensors = {"double_blocks.0.img_attn.qkv.weight": np.zeros((96, 32), np.float32)}
    write_gguf(tmp_path / "other.gguf", tensors, {}, arch=arch)
    _expect(lambda: load_transformer(tmp_path / "other.gguf"), tmp_path / "other.gguf", found)


def test_gguf_of_another_model_is_named_for_the_text_encoder_loader(tmp_path):
    path, _ = _transformer_file(tmp_path)
    _expect(lambda: load_text_encoder(path, tokenizer=qtc_tokenizer_dir()), path, "Lumina 2 / Z-Image transformer",
            "diffusion model")
    llama = tmp_path / "llama.gguf"
    write_gguf(llama, {"token_embd.weight": np.zeros((64, 32), np.float32)}, {}, arch="llama")
    _expect(lambda: load_text_encoder(llama, tokenizer=qtc_tokenizer_dir()), llama, "Llama-family")
    big = tmp_path / "qwen3_8b.gguf"
    _qwen3_gguf(big, fields={"qwen3.embedding_length": 4096, "qwen3.block_count": 36})
    _expect(lambda: load_text_encoder(big, tokenizer=qtc_tokenizer_dir()), big, "Qwen3-8B", "Qwen3-4B")
