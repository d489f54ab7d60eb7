"""Model files that try to hurt the server: each must fail fast with a CheckpointError naming the file and
the bad key or value, or (for files changed on disk after loading) leave the loaded model untouched.

Attacks that could exhaust memory, hang or crash a process run in a child with a memory cap and a
timeout (tests/limited_child.py), so a regression fails a test instead of the machine.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.limited_child import run_limited
from tests.text_fixtures import qtc_tokenizer_dir
from zimage_core import CheckpointError, load_text_encoder, load_transformer, load_vae, model_fingerprint
from zimage_core.demo_weights import (
    DEMO_TRANSFORMER,
    demo_text_encoder_state_dict,
    demo_transformer_state_dict,
    demo_vae_state_dict,
)

FAST = 3.0  # seconds: a check on names and config values, nothing built
COMFY_PREFIX = "model.diffusion_model."
# Imported before the timed attempts: the first import of transformers alone can take seconds.
TE_IMPORTS = ("from zimage_core import load_transformer, load_vae, load_text_encoder, load_tokenizer\n"
              "from transformers import Qwen3Config, Qwen3Model")
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX-only")


def _diffusers_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI transformer names -> diffusers ZImageTransformer2DModel names (split q|k|v), written here
    independently of the product's converter."""
    out = {}
    for key, value in sd.items():
        if key.endswith(".attention.qkv.weight"):
            base = key[: -len("qkv.weight")]
            for part, tensor in zip(("to_q", "to_k", "to_v"), value.chunk(3), strict=True):
                out[f"{base}{part}.weight"] = tensor.contiguous()
            continue
        key = (key.replace(".attention.out.", ".attention.to_out.0.").replace(".attention.q_norm.", ".attention.norm_q.")
               .replace(".attention.k_norm.", ".attention.norm_k."))
        for old, new in (("x_embedder.", "all_x_embedder.2-1."), ("final_layer.", "all_final_layer.2-1.")):
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


DIFFUSERS_CONFIG = {
    "_class_name": "ZImageTransformer2DModel", "dim": DEMO_TRANSFORMER.dim, "n_layers": DEMO_TRANSFORMER.n_layers,
    "n_refiner_layers": DEMO_TRANSFORMER.n_refiner_layers, "n_heads": DEMO_TRANSFORMER.n_heads,
    "n_kv_heads": DEMO_TRANSFORMER.n_kv_heads, "in_channels": 16, "all_patch_size": [2], "all_f_patch_size": [1],
    "cap_feat_dim": DEMO_TRANSFORMER.cap_feat_dim, "axes_dims": list(DEMO_TRANSFORMER.axes_dims),
    "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "norm_eps": 1e-5, "t_scale": 1000.0,
    "siglip_feat_dim": DEMO_TRANSFORMER.siglip_feat_dim,  # the demo transformer has Omni layers
}


def _write_diffusers_folder(folder: Path, sd: dict[str, torch.Tensor], config: dict, *, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    keys = sorted(sd)
    if shards == 1:
        save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: sd[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    dit_sd = {k: v.to(torch.bfloat16) for k, v in demo_transformer_state_dict().items()}
    save_file({COMFY_PREFIX + k: v for k, v in dit_sd.items()}, str(d / "dit.safetensors"))
    _write_diffusers_folder(d / "transformer", _diffusers_names(dit_sd), DIFFUSERS_CONFIG)
    save_file(demo_vae_state_dict(), str(d / "ae.safetensors"))  # float32, the stored dtype is kept
    save_file({k: v.to(torch.bfloat16) for k, v in demo_text_encoder_state_dict().items()}, str(d / "qwen.safetensors"))
    return {"dir": d, "dit": d / "dit.safetensors", "dit_folder": d / "transformer", "vae": d / "ae.safetensors",
            "te": d / "qwen.safetensors"}


def _with_extra(src: Path, dst: Path, extra: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import load_file

    save_file({**load_file(str(src)), **extra}, str(dst))
    return dst


def _assert_fast_checkpoint_error(result: dict, path: Path, *needles: str) -> None:
    assert result["ok"] is False, result
    assert result["type"] == "CheckpointError", result
    assert result["seconds"] < FAST, result
    assert str(path) in result["message"], result
    for needle in needles:
        assert needle in result["message"], result


def test_the_fixture_files_load(files):
    """The attacks below change one thing in files that are otherwise fine."""
    load_transformer(files["dit"])
    load_transformer(files["dit_folder"])
    load_vae(files["vae"])
    load_text_encoder(files["te"], tokenizer=qtc_tokenizer_dir())


# -- 1. bounded loading ------------------------------------------------------------------------------

def test_huge_layer_index_fails_fast(files, tmp_path):
    cases = {
        "dit": (_with_extra(files["dit"], tmp_path / "dit.safetensors",
                            {COMFY_PREFIX + "layers.9999999.attention.q_norm.weight": torch.ones(32)}),
                "layers.9999999"),
        "te": (_with_extra(files["te"], tmp_path / "te.safetensors",
                           {"model.layers.9999999.input_layernorm.weight": torch.ones(32)}), "layers.9999999"),
        "vae": (_with_extra(files["vae"], tmp_path / "ae.safetensors",
                            {"encoder.down.9999999.block.0.norm1.weight": torch.ones(32)}), "down.9999999"),
    }
    result = run_limited(f"""
        report(dit=attempt(lambda: load_transformer({str(cases['dit'][0])!r})),
               te=attempt(lambda: load_text_encoder({str(cases['te'][0])!r}, tokenizer={str(qtc_tokenizer_dir())!r})),
               vae=attempt(lambda: load_vae({str(cases['vae'][0])!r})))
    """, imports=TE_IMPORTS)
    assert result["status"] == "ok", result
    for name, (path, needle) in cases.items():
        _assert_fast_checkpoint_error(result[name], path, needle)


CONFIG_ATTACKS = {
    "n_layers": 10**7, "n_refiner_layers": 10**6, "dim": 2**40, "n_heads": 10**9, "cap_feat_dim": -5,
    "in_channels": "16", "axes_dims": [2] * 100_000, "axes_lens": [10**12, 1, 1], "all_patch_size": [],
    "rope_theta": "NaN", "norm_eps": True, "t_scale": None,
}


def test_huge_or_odd_config_values_fail_fast(files, tmp_path):
    folders = {}
    for key, value in CONFIG_ATTACKS.items():
        folder = tmp_path / key
        shutil.copytree(files["dit_folder"], folder)
        config = {**DIFFUSERS_CONFIG, key: value}
        text = json.dumps(config).replace('"NaN"', "NaN")  # a JSON NaN literal, as Python writes it
        (folder / "config.json").write_text(text)
        folders[key] = folder
    result = run_limited(f"""
        folders = {({k: str(v) for k, v in folders.items()})!r}
        report(**{{key: attempt(lambda f=f: load_transformer(f)) for key, f in folders.items()}})
    """, imports="from zimage_core import load_transformer")
    assert result["status"] == "ok", result
    for key, folder in folders.items():
        _assert_fast_checkpoint_error(result[key], folder / "config.json", key)


def test_tensor_shapes_that_lie_about_their_size_are_refused(files, tmp_path):
    """A header entry whose byte range does not match its shape (here: claims 10**12 values in 4 bytes)."""
    path = tmp_path / "liar.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"tensor 'x'.*needs 4000000000000 bytes") as info:
        load_transformer(path)
    assert str(path) in str(info.value)


def test_deeply_nested_json_is_a_checkpoint_error(files, tmp_path):
    folder = shutil.copytree(files["dit_folder"], tmp_path / "transformer")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="not valid JSON") as info:
        load_transformer(folder)
    assert str(folder / "config.json") in str(info.value)


# -- 2. a loaded model owns its weights -----------------------------------------------------------------

def test_models_survive_their_files_being_rewritten_and_truncated(files, tmp_path):
    """Loaded with mmap (the default) and with plain reads: a same-size rewrite (cp, rsync --inplace) must
    not change any output, and a truncation must not crash the process (SIGBUS from an mmap-backed model)."""
    paths = {}
    for name in ("dit", "vae", "te"):
        paths[name] = tmp_path / files[name].name
        shutil.copy(files[name], paths[name])
    result = run_limited(f"""
        paths = {({k: str(v) for k, v in paths.items()})!r}
        tok = {str(qtc_tokenizer_dir())!r}
        models = {{mmap: {{"dit": load_transformer(paths["dit"], mmap=mmap), "vae": load_vae(paths["vae"], mmap=mmap),
                          "te": load_text_encoder(paths["te"], tokenizer=tok, mmap=mmap)}}
                  for mmap in (True, False)}}

        def outputs():
            out = []
            for m in models.values():
                g = torch.Generator().manual_seed(0)
                x, caps = torch.randn(1, 16, 8, 8, generator=g), [torch.randn(5, 32, generator=g)]
                with torch.no_grad():
                    out += [m["dit"](x, torch.tensor([0.5]), caps),
                            m["vae"].decode(torch.randn(1, 16, 4, 4, generator=g), tiled=False),
                            m["te"].encode(["a red fox in the snow"])[0]]
            return out

        before = outputs()
        for p in paths.values():  # same size, different bytes: what cp or rsync --inplace do
            size = os.path.getsize(p)
            with open(p, "r+b") as f:
                f.write(os.urandom(size))
        rewritten = outputs()
        for p in paths.values():
            os.truncate(p, 0)
        truncated = outputs()
        report(rewritten=[bool(torch.equal(a, b)) for a, b in zip(before, rewritten)],
               truncated=[bool(torch.equal(a, b)) for a, b in zip(before, truncated)])
    """, imports=TE_IMPORTS)
    assert result["status"] == "ok", result  # "died" with returncode -7 is the SIGBUS of an mmap-backed model
    # [dit, vae, te] loaded with mmap, then the same three loaded with plain reads
    assert result["rewritten"] == [True] * 6, result
    assert result["truncated"] == [True] * 6, result


def test_plain_reads_and_mmap_give_the_same_weights(files):
    a, b = load_transformer(files["dit"], mmap=True), load_transformer(files["dit"], mmap=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    va, vb = load_vae(files["vae"], mmap=True), load_vae(files["vae"], mmap=False)
    assert all(torch.equal(x, y) for x, y in zip(va.state_dict().values(), vb.state_dict().values(), strict=True))


def test_fingerprint_follows_file_changes(files, tmp_path):
    path = shutil.copy(files["vae"], tmp_path / "ae.safetensors")
    first = model_fingerprint(path)
    assert model_fingerprint(path) == first  # stable while nothing changes
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    assert model_fingerprint(path) != first  # a rewrite in place of the same size changes the mtime
    assert model_fingerprint(tmp_path / "nothing.safetensors") == "missing"


def test_fingerprint_of_a_diffusers_folder_covers_shards_and_config(files, tmp_path):
    root = tmp_path / "Z-Image-Turbo"
    folder = shutil.copytree(files["dit_folder"], root / "transformer")
    stamps = {model_fingerprint(root)}
    (folder / "config.json").write_text(json.dumps({**DIFFUSERS_CONFIG, "norm_eps": 1e-6}) + " ")
    stamps.add(model_fingerprint(root))
    with open(folder / "diffusion_pytorch_model.safetensors", "ab") as f:
        f.write(b"\0")
    stamps.add(model_fingerprint(root))
    (root / "notes.md").write_text("not read by any loader")
    stamps.add(model_fingerprint(root))
    assert len(stamps) == 3  # config and weights count, an unrelated file does not


# -- 3. a shard index stays inside its folder -------------------------------------------------------------

def _folder_with_outside_shard(files, tmp_path, target: str) -> Path:
    from safetensors.torch import load_file

    folder = _write_diffusers_folder(tmp_path / "transformer", load_file(str(files["dit_folder"] /
                                     "diffusion_pytorch_model.safetensors")), DIFFUSERS_CONFIG, shards=2)
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    second = sorted(set(index["weight_map"].values()))[1]
    shutil.move(folder / second, tmp_path / "outside.safetensors")  # a real, valid shard outside
    index["weight_map"] = {k: (target if v == second else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("kind", ["parent", "absolute"])
def test_shard_index_pointing_outside_its_folder_is_refused(files, tmp_path, kind):
    target = "../outside.safetensors" if kind == "parent" else str(tmp_path / "outside.safetensors")
    folder = _folder_with_outside_shard(files, tmp_path, target)
    with pytest.raises(CheckpointError) as info:
        load_transformer(folder)
    message = str(info.value)
    assert "index.json" in message and target in message and "inside its own folder" in message


def test_refusal_does_not_tell_whether_the_outside_path_exists(files, tmp_path):
    messages = []
    for i, target in enumerate(["../outside.safetensors", "../does-not-exist.safetensors"]):
        folder = _folder_with_outside_shard(files, tmp_path / str(i), target)
        with pytest.raises(CheckpointError) as info:
            load_transformer(folder)
        messages.append(str(info.value).replace(target, "<target>").replace(str(tmp_path / str(i)), "<dir>"))
    assert messages[0] == messages[1]


def test_symlinked_shards_inside_the_folder_still_load(files, tmp_path):
    """Hugging Face's cache links every file to a blob elsewhere: the index names stay inside the folder."""
    folder = _folder_with_outside_shard(files, tmp_path, "shard-b.safetensors")
    (folder / "shard-b.safetensors").symlink_to(tmp_path / "outside.safetensors")
    model = load_transformer(folder)
    reference = load_transformer(files["dit_folder"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                  strict=True))


# -- 4. no hangs on FIFOs ----------------------------------------------------------------------------------

@needs_fifo
def test_fifos_are_refused_at_once(files, tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    cfg_folder = shutil.copytree(files["dit_folder"], tmp_path / "cfg_fifo")
    (cfg_folder / "config.json").unlink()
    os.mkfifo(cfg_folder / "config.json")
    shard_folder = _folder_with_outside_shard(files, tmp_path / "shards", "shard-b.safetensors")
    os.mkfifo(shard_folder / "shard-b.safetensors")
    tok_folder = tmp_path / "tokenizer"
    tok_folder.mkdir()
    os.mkfifo(tok_folder / "tokenizer.json")
    cases = {"dit": fifo, "vae": fifo, "te": fifo, "config": cfg_folder / "config.json",
             "shard": shard_folder / "shard-b.safetensors", "tokenizer_folder": tok_folder / "tokenizer.json",
             "tokenizer_file": tok_folder / "tokenizer.json"}
    result = run_limited(f"""
        report(dit=attempt(lambda: load_transformer({str(fifo)!r})),
               vae=attempt(lambda: load_vae({str(fifo)!r})),
               te=attempt(lambda: load_text_encoder({str(fifo)!r}, tokenizer={str(qtc_tokenizer_dir())!r})),
               config=attempt(lambda: load_transformer({str(cfg_folder)!r})),
               shard=attempt(lambda: load_transformer({str(shard_folder)!r})),
               tokenizer_folder=attempt(lambda: load_tokenizer({str(tok_folder)!r})),
               tokenizer_file=attempt(lambda: load_tokenizer({str(tok_folder / 'tokenizer.json')!r})))
    """, imports=TE_IMPORTS, timeout=60)
    assert result["status"] == "ok", result  # "timeout": a loader opened the FIFO and waited for a writer
    for name, path in cases.items():
        _assert_fast_checkpoint_error(result[name], path, "FIFO")


def test_a_folder_where_a_file_belongs_is_refused(files, tmp_path):
    folder = shutil.copytree(files["dit_folder"], tmp_path / "transformer")
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(CheckpointError, match="a folder") as info:
        load_transformer(folder)
    assert str(folder / "config.json") in str(info.value)


# -- 5. integer tensors are not weights ---------------------------------------------------------------------

def _replace_tensor(src: Path, dst: Path, key: str, dtype: torch.dtype) -> Path:
    from safetensors.torch import load_file

    sd = load_file(str(src))
    sd[key] = torch.ones(sd[key].shape, dtype=dtype)
    save_file(sd, str(dst))
    return dst


@pytest.mark.parametrize(("kind", "key", "dtype"), [
    ("dit", COMFY_PREFIX + "layers.0.attention.qkv.weight", torch.int32),  # decides the default dtype
    ("dit", COMFY_PREFIX + "layers.1.feed_forward.w2.weight", torch.int64),
    ("vae", "decoder.conv_in.weight", torch.int32),
    ("vae", "encoder.norm_out.bias", torch.bool),
    ("te", "model.layers.0.mlp.down_proj.weight", torch.int16),
])
def test_integer_tensors_are_refused_by_every_loader(files, tmp_path, kind, key, dtype):
    path = _replace_tensor(files[kind], tmp_path / files[kind].name, key, dtype)
    load = {"dit": load_transformer, "vae": load_vae,
            "te": lambda p: load_text_encoder(p, tokenizer=qtc_tokenizer_dir())}[kind]
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message and key in message and str(dtype) in message and "floating-point" in message


@pytest.mark.parametrize("load", [load_transformer, load_vae, load_text_encoder])
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, "bfloat16"])
def test_non_float_dtype_arguments_are_refused(files, load, dtype):
    with pytest.raises(ValueError, match="dtype must be None or one of"):
        load(files["dit"], dtype=dtype)


# -- 10. numbers that size allocations ----------------------------------------------------------------------

def test_api_numbers_that_size_allocations_are_bounded():
    result = run_limited("""
        report(flow=attempt(lambda: flow_sigmas(10**10)),
               denoise=attempt(lambda: denoise_sigmas(8, 1e-12)),
               batch_index=attempt(lambda: make_noise((1, 1, 1, 1), 0, batch_index=[10**8])),
               shape=attempt(lambda: make_noise((10**6, 16, 1024, 1024), 0)),
               sigmas=attempt(lambda: sample_euler(lambda x, s, c: x, [torch.zeros(1, 4)], torch.zeros(1, 16, 2, 2),
                                                   torch.linspace(1, 0, 10**8))))
    """, imports="from zimage_core import flow_sigmas, denoise_sigmas, make_noise, sample_euler")
    assert result["status"] == "ok", result
    for name, needle in (("flow", "steps"), ("denoise", "denoise"), ("batch_index", "batch_index"),
                         ("shape", "shape"), ("sigmas", "sigmas")):
        outcome = result[name]
        assert outcome["ok"] is False and outcome["type"] == "ValueError", (name, outcome)
        assert needle in outcome["message"] and outcome["seconds"] < FAST, (name, outcome)
