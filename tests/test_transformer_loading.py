"""load_transformer on every checkpoint layout users have, and its errors for files that are not one."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from tests.transformer_fixtures import (
    TINY,
    dequantized_copy,
    diffusers_velocity,
    import_comfy,
    make_diffusers_model,
    max_abs,
    ragged_inputs,
    rel_err,
    to_comfy,
    write_comfy_file,
    write_diffusers_folder,
)
from zimage_core import CheckpointError
from zimage_core.checkpoint import open_checkpoint
from zimage_core.transformer import (
    TransformerConfig,
    ZImageTransformer,
    comfy_state_dict_from_diffusers,
    infer_transformer_config,
    load_transformer,
)


@pytest.fixture(scope="module")
def ref():
    return make_diffusers_model(seed=0)


@pytest.fixture(scope="module")
def case(ref):
    x, sigma, caps = ragged_inputs()
    return x, sigma, caps, diffusers_velocity(ref, x, sigma, caps)


def _velocity(model, x, sigma, caps):
    with torch.no_grad():
        return model(x, sigma, caps)


def _assert_exact(model, case):
    x, sigma, caps, expected = case
    got = _velocity(model, x, sigma, caps)
    assert rel_err(got, expected) <= 1e-5, rel_err(got, expected)
    assert max_abs(got, expected) <= 1e-5, max_abs(got, expected)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_diffusers_folder(ref, case, tmp_path, sharded):
    folder = write_diffusers_folder(ref, tmp_path / "transformer", sharded=sharded)
    assert any(folder.glob("*.index.json")) == sharded
    model = load_transformer(folder)
    assert next(model.parameters()).dtype == torch.float32
    _assert_exact(model, case)


def test_diffusers_pipeline_root_uses_its_transformer_folder(ref, case, tmp_path):
    write_diffusers_folder(ref, tmp_path / "transformer", sharded=True)
    (tmp_path / "model_index.json").write_text("{}")
    _assert_exact(load_transformer(tmp_path), case)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""], ids=["prefixed", "bare"])
def test_comfy_single_file_fp32(ref, case, tmp_path, prefix):
    path = write_comfy_file(ref, tmp_path / "z.safetensors", prefix=prefix)  # includes a stray norm_final
    model = load_transformer(path)
    _assert_exact(model, case)
    assert not any(p.requires_grad for p in model.parameters())


# Tolerances against the fp32 original when computing in bf16 (the default for these files): bf16 keeps
# 8 mantissa bits (relative rounding 2^-9 per value and op), measured 0.55% output error here; fp8
# storage rounds every weight to 3 (e4m3) or 2 (e5m2) mantissa bits, a 3-6% rms weight error, measured
# 4.0% and 7.6% output error. Each bound is ~2x the measurement on this tiny random model.
STORAGE = {
    torch.bfloat16: 0.012,
    torch.float8_e4m3fn: 0.08,
    torch.float8_e5m2: 0.15,
}


@pytest.mark.parametrize("storage", list(STORAGE), ids=["bf16", "fp8_e4m3fn", "fp8_e5m2"])
def test_low_precision_storage(ref, case, tmp_path, storage):
    x, sigma, caps, expected = case
    path = write_comfy_file(ref, tmp_path / "z.safetensors", dtype=storage)
    # Same rounded weights, fp32 math on both sides: isolates our arithmetic from the storage loss.
    exact = load_transformer(path, dtype=torch.float32)
    same_weights = diffusers_velocity(dequantized_copy(ref, storage), x, sigma, caps)
    assert rel_err(_velocity(exact, x, sigma, caps), same_weights) <= 1e-5
    # Default: bf16 weights and compute (fp8 files are computed in bf16).
    model = load_transformer(path)
    assert next(model.parameters()).dtype == torch.bfloat16
    got = _velocity(model, x, sigma, caps)
    assert got.dtype == torch.float32
    assert rel_err(got, expected) <= STORAGE[storage], rel_err(got, expected)


def test_scaled_fp8_file(ref, case, tmp_path):
    # ComfyUI "scaled fp8" exports store weight / scale in e4m3 plus a per-tensor `scale_weight`.
    sd = to_comfy(ref.state_dict())
    out = {"model.diffusion_model.scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if v.ndim == 2 and k.endswith(".weight"):
            scale = v.abs().max() / 448.0
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v
    save_file(out, str(tmp_path / "scaled.safetensors"))
    model = load_transformer(tmp_path / "scaled.safetensors", dtype=torch.float32)
    x, sigma, caps, expected = case
    assert rel_err(_velocity(model, x, sigma, caps), expected) <= STORAGE[torch.float8_e4m3fn]


def test_comfy_operations_including_fp8_weight_storage(ref, case, tmp_path):
    comfy_ops, _ = import_comfy()
    x, sigma, caps, expected = case
    path = write_comfy_file(ref, tmp_path / "z.safetensors")
    for ops in (comfy_ops.disable_weight_init, comfy_ops.manual_cast):
        model = load_transformer(path, operations=ops)
        assert isinstance(model.layers[0].attention.qkv, ops.Linear)
        _assert_exact(model, case)
    # manual_cast keeps fp8 weights in memory and computes in bf16: same result as a bf16 load.
    path8 = write_comfy_file(ref, tmp_path / "z8.safetensors", dtype=torch.float8_e4m3fn)
    fp8 = load_transformer(path8, dtype=torch.float8_e4m3fn, operations=comfy_ops.manual_cast)
    assert fp8.layers[0].attention.qkv.weight.dtype == torch.float8_e4m3fn
    bf16 = load_transformer(path8)
    assert torch.equal(_velocity(fp8, x, sigma, caps), _velocity(bf16, x, sigma, caps))
    with pytest.raises(ValueError, match="dtype=torch.bfloat16"):
        load_transformer(path8, dtype=torch.float8_e4m3fn)


def test_config_inferred_from_shapes_matches_diffusers_config(ref, tmp_path):
    path = write_comfy_file(ref, tmp_path / "z.safetensors")
    cfg = infer_transformer_config(open_checkpoint(path, "a transformer"))
    assert (cfg.dim, cfg.n_layers, cfg.n_refiner_layers, cfg.n_heads, cfg.cap_feat_dim) == (
        TINY["dim"], TINY["n_layers"], TINY["n_refiner_layers"], TINY["n_heads"], TINY["cap_feat_dim"])
    assert list(cfg.axes_dims) == TINY["axes_dims"]


def test_full_config_inferred_from_comfy_key_shapes():
    full = ZImageTransformer(TransformerConfig.full(), device="meta").state_dict()
    sd = {f"model.diffusion_model.{k}": v for k, v in full.items()}
    sd["model.diffusion_model.norm_final.weight"] = torch.empty(3840, device="meta")
    sd["vae.decoder.conv_in.weight"] = torch.empty(512, 16, 3, 3, device="meta")  # all-in-one files
    assert infer_transformer_config(sd) == TransformerConfig.full()


def test_product_conversion_matches_independent_converter(ref):
    sd = ref.state_dict()
    ours = comfy_state_dict_from_diffusers(sd)
    theirs = to_comfy(sd, prefix="", stray_norm_final=False)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_load_on_meta_then_assign_leaves_no_meta_tensors(ref, tmp_path):
    model = load_transformer(write_comfy_file(ref, tmp_path / "z.safetensors"), dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())


# -- errors ---------------------------------------------------------------------------------------------

def _write(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _small(*shape):
    return torch.zeros(*shape)


def _expect_error(path, *phrases):
    with pytest.raises(CheckpointError) as info:
        load_transformer(path)
    message = str(info.value)
    assert str(path) in message
    for phrase in phrases:
        assert phrase in message, message
    return message


def test_flux_file_is_rejected(tmp_path):
    path = _write(tmp_path / "flux1-dev.safetensors", {
        "double_blocks.0.img_attn.qkv.weight": _small(9, 3), "single_blocks.0.linear1.weight": _small(4, 3),
        "img_in.weight": _small(3, 4)})
    _expect_error(path, "FLUX", "double_blocks", "z_image_turbo_bf16.safetensors")


def test_sdxl_unet_is_rejected(tmp_path):
    path = _write(tmp_path / "sdxl.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": _small(4, 4, 3, 3),
        "model.diffusion_model.output_blocks.0.0.in_layers.0.weight": _small(4)})
    _expect_error(path, "SDXL UNet", "z_image_turbo_bf16.safetensors")


def test_qwen3_text_encoder_is_rejected(tmp_path):
    path = _write(tmp_path / "qwen_3_4b.safetensors", {
        "model.embed_tokens.weight": _small(10, 8), "model.layers.0.self_attn.q_proj.weight": _small(8, 8),
        "model.layers.0.self_attn.q_norm.weight": _small(4)})
    _expect_error(path, "text encoder", "models/text_encoders")


def test_vae_is_rejected(tmp_path):
    path = _write(tmp_path / "ae.safetensors", {
        "decoder.conv_in.weight": _small(4, 16, 3, 3), "encoder.down.0.block.0.conv1.weight": _small(4, 3, 3, 3)})
    _expect_error(path, "VAE", "models/vae")


def test_truncated_file_is_rejected(ref, tmp_path):
    path = write_comfy_file(ref, tmp_path / "z.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path, "truncated", "download")


def test_pickle_checkpoint_is_rejected(ref, tmp_path):
    path = tmp_path / "z_image.ckpt"
    torch.save({"x_embedder.weight": torch.zeros(2, 2)}, path)  # a zip/pickle file, never unpickled
    _expect_error(path, "safetensors", ".ckpt")


def test_random_bytes_are_rejected(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(4096))
    _expect_error(path, "safetensors")


def test_missing_tensors_are_listed(ref, tmp_path):
    sd = to_comfy(ref.state_dict())
    del sd["model.diffusion_model.layers.1.feed_forward.w2.weight"]
    del sd["model.diffusion_model.x_pad_token"]
    path = _write(tmp_path / "partial.safetensors", sd)
    _expect_error(path, "2 missing tensor(s)", "layers.1.feed_forward.w2.weight", "x_pad_token")


def test_missing_tensors_use_diffusers_names_for_a_diffusers_folder(ref, tmp_path):
    folder = write_diffusers_folder(ref, tmp_path / "transformer")
    sd = dict(open_checkpoint(folder, "t"))
    del sd["layers.0.attention.to_k.weight"]
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    _write(folder / "diffusion_pytorch_model.safetensors", sd)
    _expect_error(folder, "1 missing tensor(s): layers.0.attention.to_k.weight")


def test_inconsistent_shapes_are_reported(ref, tmp_path):
    sd = to_comfy(ref.state_dict())
    sd["model.diffusion_model.layers.1.attention.out.weight"] = torch.zeros(64, 32)
    path = _write(tmp_path / "bad.safetensors", sd)
    _expect_error(path, "layers.1.attention.out.weight [64, 32]", "[64, 64]")


def test_config_json_that_does_not_match_the_weights(ref, tmp_path):
    folder = write_diffusers_folder(ref, tmp_path / "transformer")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_heads"] = cfg["n_kv_heads"] = 4
    cfg["axes_dims"] = [4, 6, 6]
    (folder / "config.json").write_text(json.dumps(cfg))
    _expect_error(folder, "q_norm", "config.json")


def test_safetensors_header_claims_too_much(tmp_path):
    path = tmp_path / "liar.safetensors"
    header = json.dumps({"x_embedder.weight": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 16384]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16)
    _expect_error(path, "truncated")


# -- cancel hooks ------------------------------------------------------------------------------------------

class _Interrupted(Exception):
    pass


def test_load_calls_check_interrupt_per_tensor_and_frees_a_partial_model(ref, tmp_path):
    import gc

    path = write_comfy_file(ref, tmp_path / "z.safetensors")
    calls = []
    model = load_transformer(path, check_interrupt=lambda: calls.append(1))
    assert len(calls) == len(model.state_dict())
    del model
    gc.collect()
    before = sum(type(o) is ZImageTransformer for o in gc.get_objects())

    def stop_at_5():
        calls.append(1)
        if len(calls) == 5:
            raise _Interrupted

    calls.clear()
    with pytest.raises(_Interrupted) as info:
        load_transformer(path, check_interrupt=stop_at_5, mmap=False)
    gc.collect()
    assert len(calls) == 5
    # Even while the caller holds the exception, the half-loaded model is gone.
    assert info.value is not None and sum(type(o) is ZImageTransformer for o in gc.get_objects()) == before


class _RecordingLayers:
    """A LayerLoader for plain torch.nn.Linear: records what it is given and dequantizes it itself."""

    formats = frozenset({"float8_e4m3fn"})

    def __init__(self, fail: str | None = None) -> None:
        self.seen: dict[str, tuple[dict, dict | None]] = {}
        self.fail = fail

    def handles(self, module):
        return isinstance(module, torch.nn.Linear)

    def load(self, module, name, tensors, quant, device):
        if name == self.fail:
            raise ValueError("no kernel for this layout")
        self.seen[name] = ({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, quant)
        w = tensors["weight"].float()
        if quant is not None:
            w = w * tensors["weight_scale"].float()
        module.weight = torch.nn.Parameter(w, requires_grad=False)
        if "bias" in tensors:
            module.bias = torch.nn.Parameter(tensors["bias"].float(), requires_grad=False)


def _comfy_quant_file(ref, path, form):
    """Block matmuls as ComfyUI's mixed files store them (fp8 + per-tensor weight_scale; one in a uint8
    container), described per layer by comfy_quant tensors or by the _quantization_metadata header."""
    sd = to_comfy(ref.state_dict())
    out, layers = {}, {}
    for k, v in sd.items():
        layer = k[len("model.diffusion_model."):-len(".weight")]
        if k.endswith(".weight") and layer.endswith(("attention.qkv", "feed_forward.w2")):
            scale = v.abs().max().float() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            out[k] = q.view(torch.uint8) if layer == "layers.1.feed_forward.w2" else q
            out[k[: -len("weight")] + "weight_scale"] = scale.reshape(())
            layers[layer] = {"format": "float8_e4m3fn"}
            if form == "tensors":
                out[k[: -len("weight")] + "comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'),
                                                                        dtype=torch.uint8)
        else:
            out[k] = v
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file(out, str(path), metadata=meta if form == "header" else None)
    return path, layers


@pytest.mark.parametrize("form", ["tensors", "header"])
def test_layer_loader_gets_comfy_quant_layers_as_stored(ref, case, tmp_path, form):
    from zimage_core.transformer import transformer_quant_layers

    path, layers = _comfy_quant_file(ref, tmp_path / "mixed.safetensors", form)
    assert transformer_quant_layers(path) == layers
    loader = _RecordingLayers()
    model = load_transformer(path, dtype=torch.float32, layer_loader=loader)
    # Every Linear went to the loader; the quantized ones with fp8 bytes (not dequantized), their scale and
    # config; the others as stored, without a config.
    assert set(loader.seen) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tensors, quant = loader.seen["layers.1.feed_forward.w2"]
    assert quant == {"format": "float8_e4m3fn"}
    assert tensors["weight"][0] == torch.float8_e4m3fn and tensors["weight_scale"] == (torch.float32, ())
    assert loader.seen["x_embedder"] == ({"weight": (torch.float32, (64, 64)), "bias": (torch.float32, (64,))},
                                         None)
    # ... and the model is the one the dequantizing path builds from the same file.
    x, sigma, caps, _ = case
    plain = load_transformer(path, dtype=torch.float32)
    assert torch.equal(_velocity(model, x, sigma, caps), _velocity(plain, x, sigma, caps))


def test_layer_loader_errors_name_the_file_and_layer(ref, tmp_path):
    path, _ = _comfy_quant_file(ref, tmp_path / "mixed.safetensors", "tensors")
    with pytest.raises(CheckpointError, match=r"layer layers\.0\.attention\.qkv \(float8_e4m3fn\).*no kernel"):
        load_transformer(path, dtype=torch.float32, layer_loader=_RecordingLayers(fail="layers.0.attention.qkv"))
