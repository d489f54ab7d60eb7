"""ZImageLoraLoader in the real ComfyUI, against the references: ComfyUI's own LoraLoaderModelOnly and
diffusers' `load_lora_weights` + `fuse_lora` on ZImagePipeline, per dialect, in each trainer's real key
names. fp32 on the CPU, tiny random models.

Which reference reads which dialect (read from their source, checked here: a dialect a reference does
not read leaves its model unchanged there):
- ComfyUI 0.3.75 and 0.18.1: ComfyUI `diffusion_model.` (fused qkv), kohya's fused `lora_unet_…_qkv`,
  ai-toolkit `diffusion_model.` with split q/k/v, LyCORIS `lycoris_` (LoHa), `diffusion_model.` LoKr;
  0.18.1 also diffusers `transformer.` and DiffSynth's bare names.
- diffusers 0.42.1: `transformer.`, `diffusion_model.` split, kohya/musubi `lora_unet_` (split and
  fused), ai-toolkit LoKr.
Every dialect is also written as a twin of one a reference reads (the same weight change), so the
dialects no reference reads (PEFT `base_model.model.`, kohya LoHa, and on 0.3.75 kohya split q/k/v,
diffusers and DiffSynth) are checked against a reference's result on the twin.
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path

import pytest
import torch

from tests.comfy_harness import comfy, comfy_module, patched_weights
from tests.sampling_fixtures import zimage_scheduler
from tests.transformer_fixtures import make_diffusers_model, write_comfy_file
from zimage_core.demo_weights import random_lora_state_dict, write_lora
from zimage_core.transformer import TransformerConfig

# The tiny model (tests/transformer_fixtures.TINY) as zimage_core's config, for the LoRA generator.
CONFIG = TransformerConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                           axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))
FILE = "zimage_lora_tiny.safetensors"
SEED, STEPS, PIXELS = 41, 3, 64
RANK, ALPHA, SCALE = 4, 2.0, 0.6
LORAS = {  # file stem → (dialect, form)
    "comfyui": ("comfyui", "lora"), "kohya-fused": ("kohya-fused", "lora"), "ai-toolkit": ("ai-toolkit", "lora"),
    "peft": ("peft", "lora"), "peft-base": ("peft-base", "lora"), "kohya": ("kohya", "lora"),
    "diffsynth": ("diffsynth", "lora"), "loha-lycoris": ("lycoris", "loha"), "loha-kohya": ("kohya", "loha"),
    "lokr": ("ai-toolkit", "lokr"),
    # diffusers' save_lora_weights: PEFT names, alpha in the file's metadata (lora_adapter_metadata), not tensors
    "peft-metadata": ("peft", "lora"),
}
COMFY_READS = {"comfyui", "kohya-fused", "ai-toolkit", "loha-lycoris", "lokr"}
COMFY_0_18_READS = COMFY_READS | {"peft", "diffsynth"}
DIFFUSERS_READS = {"peft", "ai-toolkit", "kohya", "kohya-fused", "lokr", "peft-metadata"}
TWIN = {"loha-kohya": "loha-lycoris", "lokr": "lokr"}  # LyCORIS forms' twins; LoRA dialects twin "comfyui"


def _name(stem: str) -> str:
    return f"zimage_lora_{stem}.safetensors"


def _comfy_version() -> tuple[int, ...]:
    import comfyui_version

    return tuple(int(x) for x in re.findall(r"\d+", comfyui_version.__version__)[:3])


def _peft_metadata(rank: int, alpha: float) -> dict[str, str]:
    """What diffusers' save_lora_weights stores for a PEFT LoRA: its LoraConfig, keys prefixed `transformer.`."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0", "w1", "w2",
                                                                    "w3"]).to_dict()
    config = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return {"lora_adapter_metadata": json.dumps(config, sort_keys=True)}


@pytest.fixture(scope="module")
def lora_setup():
    c = comfy()
    models = c.models_dir
    reference = make_diffusers_model(seed=4)
    write_comfy_file(reference, models / "diffusion_models" / FILE)
    paths = [models / "diffusion_models" / FILE]
    for stem, (dialect, form) in LORAS.items():
        rank = 2 if form == "lokr" else RANK  # peft rebuilds LoKr factors only when the rank is small
        if stem == "peft-metadata":  # the same change: alpha/rank applied from the metadata
            sd = random_lora_state_dict(CONFIG, dialect=dialect, rank=rank, alpha=rank, scale=SCALE, seed=9)
            paths.append(write_lora(models / "loras" / _name(stem), sd, metadata=_peft_metadata(rank, ALPHA)))
            continue
        sd = random_lora_state_dict(CONFIG, dialect=dialect, form=form, rank=rank, alpha=ALPHA, scale=SCALE, seed=9)
        paths.append(write_lora(models / "loras" / _name(stem), sd))
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, 12, 32, generator=g)
    cond = [[features, {"pooled_output": None, "attention_mask": torch.ones(1, 12, dtype=torch.long)}]]
    nodes = comfy_module("nodes")
    base = nodes.NODE_CLASS_MAPPINGS["ZImageModelLoader"]().load(FILE, "default")[0]
    assert base.model.diffusion_model.x_embedder.weight.dtype == torch.float32
    yield nodes, base, reference, cond, features
    comfy_module("comfy.model_management").unload_all_models()
    gc.collect()
    for p in paths:
        p.unlink(missing_ok=True)


def _ours(nodes, model, stem: str, strength: float = 1.0):
    out = nodes.NODE_CLASS_MAPPINGS["ZImageLoraLoader"]().load(model, _name(stem), strength)
    return out["result"][0], out["result"][2]


def _comfy(nodes, model, stem: str, strength: float = 1.0):
    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, _name(stem), strength)[0]


def _latent(nodes, model, cond) -> torch.Tensor:
    """ZImageTurboSampler's denoised latent, in the model's latent space (as diffusers returns it)."""
    latent = nodes.NODE_CLASS_MAPPINGS["ZImageEmptyLatent"]().generate(PIXELS, PIXELS, "custom", 1)[0]
    out = nodes.NODE_CLASS_MAPPINGS["ZImageTurboSampler"]().sample(model, cond, latent, SEED, STEPS, 3.0, 0.0)[0]
    return comfy_module("comfy.latent_formats").Flux().process_in(out["samples"])


_CACHE: dict = {}


def _once(key: str, compute):
    """A result shared by the tests of this module (e.g. the latents without a LoRA)."""
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _changed(weights: dict, base: dict) -> set[str]:
    return {k for k in base if not torch.equal(weights[k], base[k])}


@pytest.mark.parametrize("stem", sorted(LORAS))
def test_each_dialect_patches_as_comfyui_loraloader(lora_setup, stem):
    nodes, base, _, _, _ = lora_setup
    plain = patched_weights(base)
    model, report = _ours(nodes, base, stem)
    ours = patched_weights(model)
    reads = COMFY_0_18_READS if _comfy_version() >= (0, 18) else COMFY_READS
    twin = stem if stem in reads else TWIN.get(stem, "comfyui")
    expected = patched_weights(_comfy(nodes, base, twin))
    assert _changed(expected, plain), f"ComfyUI did not apply {twin}"
    if stem == "peft-metadata":  # ComfyUI ignores the metadata's alpha: applied at another strength, if at all
        theirs = patched_weights(_comfy(nodes, base, stem))
        assert any(not torch.allclose(theirs[k], ours[k]) for k in plain) or not _changed(theirs, plain)
    elif stem not in reads:  # ComfyUI leaves (part of) this dialect unapplied, e.g. ComfyUI issue 11487 for
        # kohya's split q/k/v: the gap this node fills
        assert _changed(patched_weights(_comfy(nodes, base, stem)), plain) < _changed(ours, plain)
    assert _changed(ours, plain) == _changed(expected, plain)
    for k in plain:
        torch.testing.assert_close(ours[k], expected[k], rtol=1e-5, atol=1e-6, msg=f"{stem}: {k}")
    assert "not matched: none" in report and "keys matched:" in report
    if stem == "peft-metadata":
        assert "alpha from the file's PEFT metadata (lora_adapter_metadata)" in report and "0.5 x 1 = 0.5" in report
    assert patched_weights(base).keys() == plain.keys() and not _changed(patched_weights(base), plain)  # input unchanged


def _diffusers_latent(reference, stem: str | None, features: torch.Tensor) -> torch.Tensor:
    import copy

    from diffusers import ZImagePipeline

    transformer = copy.deepcopy(reference)
    pipe = ZImagePipeline(scheduler=zimage_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                          transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    if stem is not None:
        pipe.load_lora_weights(str(comfy().models_dir / "loras" / _name(stem)))
        pipe.fuse_lora()
    noise = comfy_module("comfy.sample").prepare_noise(torch.zeros(1, 16, PIXELS // 8, PIXELS // 8), SEED)
    with torch.no_grad():
        return pipe(prompt_embeds=[features[0]], latents=noise, height=PIXELS, width=PIXELS,
                    num_inference_steps=STEPS, guidance_scale=0.0, output_type="latent").images


@pytest.mark.parametrize("stem", sorted(s for s in LORAS if not s.startswith("loha")))
def test_each_dialect_denoises_as_diffusers_load_lora_weights(lora_setup, stem):
    nodes, base, reference, cond, features = lora_setup
    twin = stem if stem in DIFFUSERS_READS else "kohya"  # (LoHa, which diffusers does not read: ComfyUI only)
    expected = _diffusers_latent(reference, twin, features)
    plain = _once("diffusers plain", lambda: _diffusers_latent(reference, None, features))
    assert _rel(expected, plain) > 3e-3  # the LoRA changes diffusers' result ...
    model, _ = _ours(nodes, base, stem)
    got = _latent(nodes, model, cond)
    print(f"{stem}: LoRA changes diffusers' latent by {_rel(expected, plain):.2e}; ours vs diffusers "
          f"{_rel(got, expected):.2e}")
    assert _rel(got, expected) < 1e-4, f"{stem}: {_rel(got, expected):.2e}"  # ... and ours the same way
    assert _rel(_once("ours plain", lambda: _latent(nodes, base, cond)), plain) < 1e-4  # (and without the LoRA)


def test_strength_zero_is_no_lora_bit_for_bit(lora_setup):
    nodes, base, _, cond, _ = lora_setup
    model, report = _ours(nodes, base, "kohya", 0.0)
    assert torch.equal(_latent(nodes, model, cond), _latent(nodes, base, cond))
    assert "strength 0: not applied" in report


def test_loras_stack_with_each_other_and_with_comfyui_and_unpatch_exactly(lora_setup):
    nodes, base, _, cond, _ = lora_setup
    plain = patched_weights(base)
    # ComfyUI's loader twice (the reference) = ours twice = ours then ComfyUI's, in any order.
    expected = patched_weights(_comfy(nodes, _comfy(nodes, base, "comfyui", 0.7), "lokr", -0.5))
    ours_twice = _ours(nodes, _ours(nodes, base, "kohya", 0.7)[0], "lokr", -0.5)[0]
    mixed = _comfy(nodes, _ours(nodes, base, "lokr", -0.5)[0], "comfyui", 0.7)
    for model in (ours_twice, mixed):
        got = patched_weights(model)
        for k in plain:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    assert len(_changed(expected, plain)) > 0
    # Sampling loads the stacked model (weights patched in place) and unloading restores them bit for bit.
    before = _latent(nodes, base, cond)
    _latent(nodes, ours_twice, cond)
    comfy_module("comfy.model_management").unload_all_models()
    after = {k: v.detach().clone() for k, v in base.model.diffusion_model.state_dict().items()}
    assert all(torch.equal(after[k], plain[k]) for k in plain)
    assert torch.equal(_latent(nodes, base, cond), before)


def test_report_is_the_node_ui_text_and_output(lora_setup):
    from tests.comfy_harness import run_ok

    prompt = {
        "1": {"class_type": "ZImageModelLoader", "inputs": {"model_name": FILE, "weight_dtype": "default"}},
        "2": {"class_type": "ZImageLoraLoader", "inputs": {"model": ["1", 0], "lora_name": _name("kohya"),
                                                           "strength_model": 0.8}},
        "3": {"class_type": "ZImageLoraLoader", "inputs": {"model": ["2", 0], "lora_name": _name("lokr"),
                                                           "strength_model": 1.0}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}},
    }
    result = run_ok(prompt)
    (kohya,) = result.outputs["2"]["text"]
    assert kohya.startswith(f"LoRA {_name('kohya')}") and "kohya / musubi (lora_unet_)" in kohya
    assert "alpha 2; effective scale (alpha/rank x strength): 0.5 x 0.8 = 0.4" in kohya
    (lokr,) = result.outputs["3"]["text"]
    assert "LoKr" in lokr and "not matched: none" in lokr


def test_other_models_lora_is_refused_with_a_clear_error(lora_setup):
    from safetensors.torch import save_file

    from tests.comfy_harness import comfy as harness

    path = harness().models_dir / "loras" / "zimage_test_flux_lora.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}, str(path))
    try:
        prompt = {
            "1": {"class_type": "ZImageModelLoader", "inputs": {"model_name": FILE, "weight_dtype": "default"}},
            "2": {"class_type": "ZImageLoraLoader", "inputs": {"model": ["1", 0], "lora_name": path.name,
                                                               "strength_model": 1.0}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
        }
        result = harness().run(prompt)
        assert not result.ok
        message = result.error_message
        assert f"LoRA {path.name} is not a Z-Image LoRA: it looks like a FLUX.1" in message, message
        assert "Traceback" not in message
    finally:
        path.unlink(missing_ok=True)


def _broken_lora(name: str, edit, *, dialect: str = "comfyui", every: bool = False, metadata=None) -> Path:
    """A LoRA file whose first module (or every module) is changed by `edit(sd, module)`."""
    sd = random_lora_state_dict(CONFIG, dialect=dialect, rank=RANK, alpha=ALPHA, scale=SCALE, seed=9)
    downs = sorted(k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight"))
    downs += sorted(k[: -len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight"))
    for module in downs if every else downs[:1]:
        edit(sd, module)
    return write_lora(comfy().models_dir / "loras" / name, sd, metadata=metadata)


def test_report_counts_only_what_comfyui_patches_when_a_module_is_skipped(lora_setup):
    """One module's up/down ranks differ: ComfyUI's adapter skips it at load time (a log line). The report says
    so, and its "N weights patched" is the number of weights that actually change, as with LoraLoaderModelOnly."""
    nodes, base, *_ = lora_setup

    def mismatch(sd, module):
        sd[module + ".lora_up.weight"] = torch.randn(sd[module + ".lora_up.weight"].shape[0], RANK + 1)

    path = _broken_lora("zimage_test_rank_mismatch.safetensors", mismatch)
    try:
        plain = patched_weights(base)
        out = nodes.NODE_CLASS_MAPPINGS["ZImageLoraLoader"]().load(base, path.name, 1.0)
        model, report = out["result"][0], out["result"][2]
        changed = _changed(patched_weights(model), plain)
        comfy_changed = _changed(patched_weights(nodes.LoraLoaderModelOnly().load_lora_model_only(base, path.name, 1.0)[0]),
                                 plain)
        assert changed == comfy_changed and changed
        patched = int(re.search(r"transformer: (\d+) weights patched", report).group(1))
        assert patched == len(changed), report
        assert "damaged: up has rank 5 but down has rank 4" in report and "not matched: 3" in report, report
    finally:
        path.unlink(missing_ok=True)


HUGE = "9" * 5000
UNUSABLE = {
    "rank 0": (lambda sd, m: sd.update({m + ".lora_up.weight": torch.zeros(sd[m + ".lora_up.weight"].shape[0], 0),
                                        m + ".lora_down.weight": torch.zeros(0, sd[m + ".lora_down.weight"].shape[1])}),
               {}, "cannot be applied: module .*: rank 0"),
    "alpha of shape [3]": (lambda sd, m: sd.__setitem__(m + ".alpha", torch.ones(3)), {},
                           "cannot be applied: module .*: its alpha holds 3 values"),
    "PEFT lora_alpha 'x'": (lambda sd, m: None, {"dialect": "peft", "metadata": "x"},
                            r"PEFT metadata \(lora_adapter_metadata\) has lora_alpha = 'x'"),
    "rsLoRA r = -4": (lambda sd, m: None, {"dialect": "peft", "metadata": -4},
                      r"PEFT metadata \(lora_adapter_metadata\) has r = -4"),
    # Qwen3-style names (the text encoder's layer index was parsed with int()), the CLIP connected.
    "5000-digit layer index": (lambda sd, m: sd.update({f"text_encoder.model.layers.{HUGE}.self_attn.q_proj"
                                                        + k[len(m):]: sd.pop(k) for k in list(sd) if k.startswith(m)}),
                               {"clip": True}, "is not a Z-Image LoRA"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
def test_unusable_lora_files_give_a_clear_error_naming_the_file(lora_setup, case):
    """Each of these raised a raw ZeroDivisionError / RuntimeError / TypeError / math domain error / integer-size
    error before; now a ValueError naming the file, what is wrong and what to do."""
    nodes, base, *_ = lora_setup
    edit, options, message = UNUSABLE[case]
    metadata = None
    if "metadata" in options:
        value = options["metadata"]
        config = {"lora_alpha": value, "r": RANK} if value == "x" else {"lora_alpha": ALPHA, "r": value,
                                                                          "use_rslora": True}
        metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    path = _broken_lora("zimage_test_unusable.safetensors", edit, dialect=options.get("dialect", "comfyui"),
                        every=True, metadata=metadata)
    clip = None
    if options.get("clip"):
        from zimage_core.demo_weights import DEMO_FILES

        clip = nodes.NODE_CLASS_MAPPINGS["ZImageTextEncoderLoader"]().load(DEMO_FILES["text_encoders"])[0]
    try:
        with pytest.raises(ValueError, match=f"ZImageLoraLoader: LoRA {path.name}.*{message}") as e:
            nodes.NODE_CLASS_MAPPINGS["ZImageLoraLoader"]().load(base, path.name, 1.0, clip)
        assert type(e.value) is ValueError and len(str(e.value)) < 1500
    finally:
        path.unlink(missing_ok=True)


def test_pickle_lora_is_refused_when_queued(lora_setup):
    nodes, *_ = lora_setup
    check = nodes.NODE_CLASS_MAPPINGS["ZImageLoraLoader"].VALIDATE_INPUTS(lora_name="old_style.ckpt")
    assert isinstance(check, str) and "not a .safetensors file" in check


def test_two_stacked_loras_workflow_runs_and_reports_on_each_node():
    """workflows/z_image_turbo_two_loras.json on the demo files: ComfyUI-format LoRA, then a kohya LoRA with a
    text-encoder part on top (model and CLIP pass through both nodes)."""
    from tests.comfy_harness import (
        DEMO_LORA,
        DEMO_LORA_KOHYA,
        TWO_LORAS,
        demo_prompt,
        nodes_of,
        run_ok,
        saved_images,
    )

    prompt = demo_prompt(TWO_LORAS, width=64, height=64)  # as tests/frontend/lora_report.js queues it
    first, second = sorted(nodes_of(prompt, "ZImageLoraLoader"), key=lambda k: (len(k), k))
    assert prompt[second]["inputs"]["model"] == [first, 0] and prompt[second]["inputs"]["clip"] == [first, 1]
    result = run_ok(prompt)
    (image,) = saved_images(result)
    assert image.shape == (64, 64, 3)
    (report1,) = result.outputs[first]["text"]
    (report2,) = result.outputs[second]["text"]
    assert report1.startswith(f"LoRA {DEMO_LORA}") and "text encoder:" not in report1
    assert report2.startswith(f"LoRA {DEMO_LORA_KOHYA}") and "kohya / musubi (lora_unet_)" in report2
    assert "text encoder: 14 weights patched" in report2  # the demo Qwen3 runs 2 layers x 7 linears
    assert "text encoder's last layer(s)" in report2  # its third layer is never run: listed, not applied
    # What ComfyUI's real frontend showed on these two nodes after queueing this workflow with the same
    # files (tests/frontend/lora_report.js: web/zimage.js fills a read-only text box from the UI output).
    shown = json.loads((Path(__file__).parent / "frontend" / "lora_report_ui.json").read_text())
    assert shown["page_errors"] == []
    assert [(n["node"], n["lora_name"]) for n in shown["nodes"]] == [(int(first), DEMO_LORA),
                                                                      (int(second), DEMO_LORA_KOHYA)]
    for node, report in zip(shown["nodes"], (report1, report2), strict=True):
        assert node["text_box"] == node["widget_text"] == report
        assert node["text_box_visible"] and node["read_only"]
    # The text box is display only: the frontend does not send it with the prompt.
    assert all(sorted(inputs) == ["clip", "lora_name", "model", "strength_clip", "strength_model"]
               for inputs in shown["prompt_inputs"])


def _real(weights: dict) -> dict[str, torch.Tensor]:
    """Stored weights → the values the model computes with (fp8_e4m3fn_fast keeps one scale per row)."""
    out = {}
    for k, v in weights.items():
        scale = weights.get(k + "_scale")
        out[k] = v.float() * scale.reshape(-1, 1) if scale is not None else v.float()
    return out


STORED = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3fn": torch.float8_e4m3fn,
          "fp8_e4m3fn_fast": torch.float8_e4m3fn}


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp16", "fp8_e4m3fn", "fp8_e4m3fn_fast"])
def test_low_precision_weights_are_patched_within_the_rounding_bound(lora_setup, weight_dtype):
    """The LoRA is computed in float32 on the real weight and stored back in the weight's dtype. Every patched
    weight must be the exact result (stored base + the fp32 change ComfyUI computes) within that dtype's
    rounding: bf16/fp16 round to nearest; for fp8 the bound the report states: stochastic rounding < one fp8
    step, fp8_e4m3fn_fast round-to-nearest <= half a step of its row scale."""
    nodes, base32, *_ = lora_setup
    delta = {k: v - p for (k, v), p in zip(patched_weights(_ours(nodes, base32, "kohya")[0]).items(),
                                           patched_weights(base32).values(), strict=True)}
    base = nodes.NODE_CLASS_MAPPINGS["ZImageModelLoader"]().load(FILE, weight_dtype)[0]
    model, report = _ours(nodes, base, "kohya")
    plain_stored, patched_stored = patched_weights(base), patched_weights(model)
    plain, patched = _real(plain_stored), _real(patched_stored)
    fast = weight_dtype.endswith("fast")
    if weight_dtype.startswith("fp8"):
        assert "fp8: " in report and ("rounds to nearest" if fast else "rounds stochastically") in report
    else:
        assert "fp8" not in report
    checked = 0
    for k, d in delta.items():
        if not d.abs().max() > 0 or patched_stored[k].dtype != STORED[weight_dtype]:
            continue
        exact = plain[k] + d
        err = (patched[k] - exact).abs()
        if weight_dtype == "bf16":
            bound = 2**-8 * exact.abs()  # half a step: 8 significant bits
        elif weight_dtype == "fp16":
            bound = 2**-11 * exact.abs() + 2**-25  # 11 significant bits; subnormal steps 2^-24
        elif fast:
            scale = patched_stored[k + "_scale"].reshape(-1, 1)
            clip = (exact.abs() - 448 * scale).clamp(min=0)
            bound = 2**-4 * exact.abs() + 2**-10 * scale + clip
        else:
            bound = 2**-3 * exact.abs() + 2**-9
        assert (err <= bound * (1 + 1e-5) + 1e-12).all(), f"{weight_dtype} {k}: {float((err - bound).max())}"
        assert not torch.equal(patched_stored[k], plain_stored[k])  # the LoRA is there
        checked += 1
    assert checked == 20  # every patched block weight: qkv, out, w1, w2, w3 of 4 blocks


def test_text_encoder_lora_matches_peft_on_transformers_qwen3(lora_setup):
    """A Qwen3 LoRA (kohya names, alpha) on our CLIP gives the caption features transformers' Qwen3 gives with
    the same change merged by PEFT (hidden_states[-2], Z-Image's features). Our CLIP computes in fp32 (as
    ComfyUI's does) on the bf16 weights, and the patched weights are stored back in bf16, as ComfyUI stores
    them: the comparison is at bf16 precision; the LoRA changes the features far more than that."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from zimage_core.demo_weights import (
        DEMO_FILES,
        demo_text_encoder_lora_targets,
        random_text_encoder_lora_state_dict,
    )

    nodes, base, *_ = lora_setup
    models = comfy().models_dir
    lora = dict(rank=4, alpha=2.0, scale=0.4, seed=7)
    path = write_lora(models / "loras" / "zimage_test_te_lora.safetensors",
                      random_text_encoder_lora_state_dict(demo_text_encoder_lora_targets(), dialect="kohya", **lora))
    try:
        clip = nodes.NODE_CLASS_MAPPINGS["ZImageTextEncoderLoader"]().load(DEMO_FILES["text_encoders"])[0]
        out = nodes.NODE_CLASS_MAPPINGS["ZImageLoraLoader"]().load(base, path.name, 1.0, clip=clip,
                                                                   strength_clip=1.0)
        patched_clip = out["result"][1]
        tokens = clip.tokenize("a lighthouse at dusk")
        ids = torch.tensor([[t[0] for t in tokens["qwen3_4b"][0]]])
        ours = patched_clip.encode_from_tokens(tokens).float()[0]
        plain = clip.encode_from_tokens(tokens).float()[0]
    finally:
        path.unlink(missing_ok=True)

    # Reference: transformers' Qwen3 with the demo file's weights, the same change in PEFT's names
    # (diffusers-style file: alpha folded into lora_B, so PEFT's own scale is 1).
    config = Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True)
    lm = Qwen3ForCausalLM(config).eval()
    missing, unexpected = lm.load_state_dict(load_file(str(models / "text_encoders" / DEMO_FILES["text_encoders"])),
                                             strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    with torch.no_grad():
        expected_plain = lm.model(ids, output_hidden_states=True).hidden_states[-2][0]
    peft_sd = {k.replace("text_encoder.", "base_model.model.", 1): v for k, v in random_text_encoder_lora_state_dict(
        demo_text_encoder_lora_targets(), dialect="diffusers", **lora).items()}
    peft_model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=4, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    result = set_peft_model_state_dict(peft_model, peft_sd)
    assert not result.unexpected_keys
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        expected = merged.model(ids, output_hidden_states=True).hidden_states[-2][0]
    assert ours.shape == expected.shape
    change = _rel(expected, plain)
    err, err_plain = _rel(ours, expected), _rel(plain, expected_plain)
    print(f"text-encoder LoRA: changes features by {change:.2e}; ours vs transformers+PEFT {err:.2e} "
          f"({err_plain:.2e} without the LoRA)")
    # The patched weights' bf16 rounding moves the features by ~5e-3 here; a wrong module or scale would be off
    # by a sizeable part of the change. Without the LoRA the weights are the file's: fp32 compute on them.
    assert err_plain < 1e-5 and err < 0.03 and change > 0.5


def test_a_lora_replaced_on_disk_is_read_again(lora_setup):
    nodes, *_ = lora_setup
    cls = nodes.NODE_CLASS_MAPPINGS["ZImageLoraLoader"]
    path = comfy().models_dir / "loras" / "zimage_test_replaced.safetensors"
    try:
        write_lora(path, random_lora_state_dict(CONFIG, dialect="comfyui", rank=2))
        first = cls.IS_CHANGED(lora_name=path.name)
        write_lora(path, random_lora_state_dict(CONFIG, dialect="comfyui", rank=4))
        assert cls.IS_CHANGED(lora_name=path.name) != first
        assert cls.IS_CHANGED(lora_name="no_such_lora.safetensors") == "missing"
    finally:
        path.unlink(missing_ok=True)
