"""ComfyUI's operations on our MODEL: ZImageModelLoader builds the transformer with the layers ComfyUI
would pick for the file and computes in the dtype ComfyUI would, compared with native UNETLoader on the same
file through KSampler (fp32 CPU, ≤ 1e-4).

- A comfy_quant fp8-mixed file (block matmuls float8_e4m3fn with per-tensor scales, the rest bf16), written
  with ComfyUI's own quantisation (comfy.quant_ops.QuantizedTensor.from_float) and serialisation (its
  mixed-precision Linear's state_dict: weight, weight_scale, comfy_quant), loads through ComfyUI's
  mixed-precision layers: the block weights stay QuantizedTensors, as native keeps them. Also with the
  `_quantization_metadata` header form QUANTIZATION.md describes (the one 0.3.75 reads), and with a LoRA.
- `--bf16-unet` on the CPU: bf16 weights computed in fp32 (ComfyUI's unet_manual_cast), as UNETLoader does.

The file is full-width but shallow (ComfyUI detects Z-Image only at dim 3840), as in test_comfy_native_parity.
"""

from __future__ import annotations

import gc
import json
import time

import pytest
import torch

from tests.comfy_harness import comfy, comfy_module
from zimage_core.accel.prefetch import WeightPrefetcher
from zimage_core.demo_weights import write_random_lora, write_random_transformer
from zimage_core.transformer import TransformerConfig

CONFIG = TransformerConfig(n_layers=1, n_refiner_layers=2)
BF16 = "zimage_ops_bf16.safetensors"
MIXED = {"comfy_quant": "zimage_ops_fp8mixed.safetensors", "header": "zimage_ops_fp8mixed_header.safetensors"}
LORA = "zimage_ops_lora.safetensors"
PREFIX = "model.diffusion_model."
STEPS = 2
# The main blocks' matmuls are quantised; refiners, embedders, modulation and final layer stay bf16 (a "mixed"
# file). Few quantised layers and one step: ComfyUI dequantises each fp8 weight at every call on the CPU.
QUANTISED = tuple(f"layers.{i}.{m}" for i in range(CONFIG.n_layers)
                  for m in ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))
MIXED_STEPS = 1


def _has_comfy_quant_tensors() -> bool:
    """0.18.1+ write and read per-layer `comfy_quant` tensors; 0.3.75 reads only the header form."""
    return hasattr(comfy_module("comfy.utils"), "detect_layer_quantization")


def _fp8_state_dict(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One Linear's tensors as ComfyUI writes them for the float8_e4m3fn comfy_quant format."""
    ops = comfy_module("comfy.ops")
    quant_ops = comfy_module("comfy.quant_ops")
    layout = quant_ops.QUANT_ALGOS["float8_e4m3fn"]["comfy_tensor_layout"]
    qt = quant_ops.QuantizedTensor.from_float(weight.float(), layout)
    if not _has_comfy_quant_tensors():  # 0.3.75: its QuantizedTensor, no serialiser
        return {f"{name}.weight": qt._qdata, f"{name}.weight_scale": qt._layout_params["scale"]}
    linear = ops.mixed_precision_ops({}, torch.float32).Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = torch.nn.Parameter(qt, requires_grad=False)
    linear.quant_format = "float8_e4m3fn"
    return linear.state_dict(prefix=f"{name}.")


def _write_mixed(models, bf16_path):
    utils = comfy_module("comfy.utils")
    sd = utils.load_torch_file(str(bf16_path))
    quantised = {}
    for key in list(sd):
        layer = key[len(PREFIX):-len(".weight")]
        if key.endswith(".weight") and layer in QUANTISED:
            quantised[layer] = _fp8_state_dict(key[:-len(".weight")], sd.pop(key))
    assert len(quantised) == len(QUANTISED)
    if _has_comfy_quant_tensors():
        for layer_sd in quantised.values():
            sd.update(layer_sd)
        path = models / "diffusion_models" / MIXED["comfy_quant"]
        utils.save_torch_file(sd, str(path))
        return path
    # 0.3.75 reads the header form (QUANTIZATION.md): fp8 weights and scales, the layers in the metadata.
    for layer_sd in quantised.values():
        sd.update(layer_sd)
    header = {"format_version": "1.0", "layers": {layer: {"format": "float8_e4m3fn"} for layer in quantised}}
    path = models / "diffusion_models" / MIXED["header"]
    utils.save_torch_file(sd, str(path), metadata={"_quantization_metadata": json.dumps(header)})
    return path


@pytest.fixture(scope="module")
def ops_setup():
    mm = comfy_module("comfy.model_management")
    models = comfy().models_dir
    bf16 = write_random_transformer(models / "diffusion_models" / BF16, CONFIG, seed=5)
    mixed = _write_mixed(models, bf16)
    lora = write_random_lora(models / "loras" / LORA, CONFIG, dialect="comfyui", seed=9, scale=0.3)
    nodes = comfy_module("nodes")
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, 20, 2560, generator=g)
    cond = [[features, {"pooled_output": None, "attention_mask": torch.ones(1, 20, dtype=torch.long)}]]
    latent = nodes.NODE_CLASS_MAPPINGS["ZImageEmptyLatent"]().generate(32, 16, "custom", 1)[0]
    yield nodes, cond, latent
    mm.unload_all_models()
    gc.collect()
    for p in [bf16, mixed, lora]:
        p.unlink(missing_ok=True)


def _load(nodes, which: str, file: str):
    if which == "native":
        return nodes.UNETLoader().load_unet(file, "default")[0]
    return nodes.NODE_CLASS_MAPPINGS["ZImageModelLoader"]().load(file, "default")[0]


def _sample(nodes, model, cond, latent, steps: int = STEPS) -> torch.Tensor:
    return nodes.KSampler().sample(model, 77, steps, 1.0, "euler", "simple", cond, cond, latent, 1.0)[0]["samples"]


def _free(mm) -> None:
    mm.unload_all_models()
    gc.collect()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and a.shape == b.shape
    return float((a - b).abs().max())


def test_comfy_quant_fp8_mixed_file_runs_through_comfyui_layers_and_matches_unetloader(ops_setup):
    nodes, cond, latent = ops_setup
    mm = comfy_module("comfy.model_management")
    nodes_lora = nodes.LoraLoaderModelOnly()
    # What each ComfyUI writes and reads: comfy_quant tensors (0.18.1+), the header form (0.3.75; on 0.18.1+ it
    # goes through the same code on our side and through convert_old_quants on native's).
    form = "comfy_quant" if _has_comfy_quant_tensors() else "header"
    results = {}
    for which in ("native", "ours"):
        t0 = time.time()
        model = _load(nodes, which, MIXED[form])
        print(f"{which} {form}: loaded in {time.time() - t0:.0f} s")
        dm = model.model.diffusion_model
        qkv = dm.layers[0].attention.qkv
        # ComfyUI's mixed-precision layer holds the quantised weight as it is in the file ...
        assert "MixedPrecisionOps" in type(qkv).__qualname__, type(qkv).__qualname__
        assert type(qkv.weight).__name__ == "QuantizedTensor", f"{which} {form}: {type(qkv.weight)}"
        assert qkv.weight._qdata.dtype == torch.float8_e4m3fn
        # ... and an unquantised Linear in ComfyUI's compute dtype (fp32 on the CPU).
        assert dm.x_embedder.weight.dtype == torch.float32 and type(dm.x_embedder.weight) is torch.nn.Parameter
        if which == "ours":
            # Our prefetch of offloaded weights leaves the quantised ones to their layers' own copies.
            pf = WeightPrefetcher(dm.blocks(), "cpu", select=lambda t: True)
            assert not any(type(t).__name__ == "QuantizedTensor" for ts in pf.tensors for t in ts)
            assert pf.tensors  # the blocks' plain tensors (norms, modulation) still are
            pf.remove()
        t0 = time.time()
        results[which, form] = _sample(nodes, model, cond, latent, MIXED_STEPS)
        print(f"{which} {form}: sampled in {time.time() - t0:.0f} s")
        if which == "native":
            patched = nodes_lora.load_lora_model_only(model, LORA, 1.0)[0]
        else:  # our LoRA loader: ComfyUI's weight patches on the quantised weights, as LoraLoaderModelOnly
            out = nodes.NODE_CLASS_MAPPINGS["ZImageLoraLoader"]().load(model, LORA, 1.0)["result"]
            patched, report = out[0], out[2]
            assert "per-row" not in report, report  # our fp8_e4m3fn_fast note is not for these layers
            if _has_comfy_quant_tensors():  # 0.3.75's QuantizedTensor state_dict shows no fp8 weights
                assert "ComfyUI rounds stochastically" in report, report
        results[which, "lora"] = _sample(nodes, patched, cond, latent, MIXED_STEPS)
        # The LoRA's patches were applied to the quantised weights of this model, which stay quantised.
        assert type(qkv.weight).__name__ == "QuantizedTensor"
        model = dm = qkv = patched = None
        _free(mm)
    errors = {key: _max_err(results["ours", key], results["native", key]) for key in (form, "lora")}
    print("max |ours - native| (KSampler latents):", errors)
    for key, err in errors.items():
        assert err <= 1e-4, f"{key}: {err}"
    # The LoRA changes the image (so it was compared applied).
    assert _max_err(results["native", "lora"], results["native", form]) > 1e-2


def test_bf16_unet_on_the_cpu_computes_in_fp32_as_unetloader(ops_setup):
    """--bf16-unet stores bf16; on the CPU ComfyUI computes it in fp32 (unet_manual_cast), and so do we."""
    nodes, cond, latent = ops_setup
    mm = comfy_module("comfy.model_management")
    args = comfy_module("comfy.cli_args").args
    results = {}
    before = args.bf16_unet
    args.bf16_unet = True
    try:
        for which in ("native", "ours"):
            model = _load(nodes, which, BF16)
            assert model.model.diffusion_model.layers[0].attention.qkv.weight.dtype == torch.bfloat16
            assert model.model.manual_cast_dtype == torch.float32
            results[which] = _sample(nodes, model, cond, latent)
            model = None
            _free(mm)
    finally:
        args.bf16_unet = before
    err = _max_err(results["ours"], results["native"])
    print("--bf16-unet max |ours - native| (KSampler latents):", err)
    # Computing in bf16 instead puts the latents ~6e-3 apart; fp32 compute: ~1e-6.
    assert err <= 1e-4, err
