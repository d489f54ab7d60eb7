"""zimage_core.lora: every trainer's key names mapped onto Z-Image, the report, and other models' LoRAs refused.

Key-level checks (no weights are patched here; tests/test_comfy_lora.py patches and samples). The
reference for the dialects diffusers reads is diffusers' own converter
(`_convert_non_diffusers_z_image_lora_to_diffusers`): every module it maps must land on the weight
(and q/k/v rows) that diffusers' module name means on our fused layout.
"""

from __future__ import annotations

import re

import pytest
import torch

from zimage_core.demo_weights import (
    DEMO_TRANSFORMER,
    LORA_DIALECTS,
    demo_text_encoder_lora_targets,
    demo_transformer_state_dict,
    random_lora_state_dict,
    random_text_encoder_lora_state_dict,
)
from zimage_core.lora import NotZImageLoraError, plan_lora

MODEL = {"diffusion_model." + k: tuple(v.shape) for k, v in demo_transformer_state_dict().items()}
DIM = DEMO_TRANSFORMER.dim
# The host CLIP's keys: our encoder loads every decoder layer but the last (Z-Image reads layer -2).
TE_TARGETS = demo_text_encoder_lora_targets()
TE_LAYERS = 1 + max(int(k.split(".")[1]) for k in TE_TARGETS)
CLIP = {f"transformer.{k}.weight": s for k, s in TE_TARGETS.items() if int(k.split(".")[1]) < TE_LAYERS - 1}


def _plan(sd: dict, model=MODEL, clip=None, name="test.safetensors"):
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    alphas = {k: float(v) for k, v in sd.items() if k.endswith(".alpha")}
    return plan_lora(shapes, alphas, name=name, model_shapes=model, clip_shapes=clip)


def _blocks():
    cfg = DEMO_TRANSFORMER
    return ([f"layers.{i}" for i in range(cfg.n_layers)]
            + [f"{k}.{i}" for k in ("noise_refiner", "context_refiner") for i in range(cfg.n_refiner_layers)])


def _landing(plan) -> dict:
    """{(host key, row start, row count)} the plan patches."""
    out = set()
    for dest in plan.model_map.values():
        key, offset = (dest, None) if isinstance(dest, str) else dest
        rows = MODEL[key][0]
        out.add((key, 0, rows) if offset is None else (key, offset[1], offset[2]))
    return out


def _rows(landing: set) -> dict[str, set[int]]:
    """{host key: rows patched}: fused or split, the same rows are the same change's place."""
    out: dict[str, set[int]] = {}
    for key, start, n in landing:
        out.setdefault(key, set()).update(range(start, start + n))
    return out


EVERY_ROW = {(f"diffusion_model.{b}.{m}.weight", 0, MODEL[f"diffusion_model.{b}.{m}.weight"][0])
             for b in _blocks() for m in ("attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}


@pytest.mark.parametrize("dialect", LORA_DIALECTS)
def test_every_dialect_maps_every_key_onto_the_same_weights(dialect):
    plan = _plan(random_lora_state_dict(DEMO_TRANSFORMER, dialect=dialect, alpha=2.0))
    report = plan.report
    assert report.unmatched_keys == 0 and report.matched_keys == report.total_keys > 0, report.text()
    landing = _landing(plan)
    fused = dialect in ("comfyui", "kohya-fused")
    for b in _blocks():
        qkv = f"diffusion_model.{b}.attention.qkv.weight"
        expected = {(qkv, 0, 3 * DIM)} if fused else {(qkv, i * DIM, DIM) for i in range(3)}
        assert expected <= landing
    assert EVERY_ROW <= landing
    assert len(landing) == len(EVERY_ROW) + len(_blocks()) * (1 if fused else 3)
    assert not plan.clip_map


@pytest.mark.parametrize("form,dialect", [("loha", "lycoris"), ("loha", "kohya"), ("lokr", "diffusers"),
                                          ("lokr", "lycoris")])
def test_lycoris_forms_land_on_split_rows(form, dialect):
    plan = _plan(random_lora_state_dict(DEMO_TRANSFORMER, dialect=dialect, form=form, rank=2, alpha=1.0))
    report = plan.report
    assert report.unmatched_keys == 0, report.text()
    assert {h.form for h in report.hits} == {"LoHa" if form == "loha" else "LoKr"}
    assert {h.scale for h in report.hits} == {0.5}  # alpha 1 / rank 2, as ComfyUI's adapters scale it
    text = report.text(0.8)
    assert "0.5 x 0.8 = 0.4" in text and "(q,k,v rows)" in text


@pytest.mark.parametrize("dialect", ["kohya", "kohya-fused", "diffusers", "peft", "comfyui"])
def test_targets_agree_with_diffusers_own_conversion(dialect):
    """Where diffusers' converter maps a module, we patch the weight rows diffusers' name means."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    from zimage_core.transformer import comfy_key_for_diffusers

    sd = random_lora_state_dict(DEMO_TRANSFORMER, dialect=dialect, alpha=2.0)
    converted = sd if dialect == "peft" else _convert_non_diffusers_z_image_lora_to_diffusers(dict(sd))
    theirs = set()
    for key in converted:
        if key.endswith(".lora_A.weight"):
            name = key[len("transformer."):-len(".lora_A.weight")]
            comfy, part = comfy_key_for_diffusers(name + ".weight")
            if "diffusion_model." + comfy not in MODEL:
                continue  # diffusers keeps a module its model does not have (e.g. comfy's fused qkv)
            theirs.add(("diffusion_model." + comfy, 0, 3 * DIM) if part is None and comfy.endswith("qkv.weight")
                       else ("diffusion_model." + comfy, (part or 0) * DIM, DIM) if part is not None
                       else ("diffusion_model." + comfy, 0, MODEL["diffusion_model." + comfy][0]))
    assert theirs and _rows(theirs) == _rows(_landing(_plan(sd)))


def test_report_counts_rank_alpha_scale_and_coverage():
    plan = _plan(random_lora_state_dict(DEMO_TRANSFORMER, dialect="kohya", rank=4, alpha=2.0), name="style.safetensors")
    text = plan.report.text(1.5)
    assert text.splitlines()[0] == "LoRA style.safetensors"
    assert "kohya / musubi (lora_unet_)" in text
    n_keys = len(_blocks()) * 7 * 3  # q, k, v, out, w1, w2, w3 × (down, up, alpha)
    assert f"keys matched: {n_keys} of {n_keys}; not matched: 0" in text
    assert f"transformer: {len(_blocks()) * 5} weights patched" in text
    assert "rank 4" in text and "alpha 2" in text and "0.5 x 1.5 = 0.75" in text
    assert "layers 0-1" in text and "noise_refiner 0" in text and "context_refiner 0" in text
    assert "not matched: none" in text


def test_unmatched_keys_are_listed_grouped_with_the_reason():
    sd = random_lora_state_dict(DEMO_TRANSFORMER, dialect="comfyui")
    for i in range(3):  # a module this model does not have, in three blocks
        sd[f"diffusion_model.layers.{i}.attention.gate.lora_down.weight"] = torch.zeros(4, DIM)
        sd[f"diffusion_model.layers.{i}.attention.gate.lora_up.weight"] = torch.zeros(DIM, 4)
    sd["diffusion_model.layers.0.feed_forward.w1.lora_up.weight"] = torch.zeros(7, 4)  # wrong shape
    sd["some_training_step"] = torch.tensor(3)
    report = _plan(sd).report
    text = report.text()
    assert "  no such Z-Image weight:\n    diffusion_model.layers.N.attention.gate (6 keys)" in text
    assert "does not fit layers.0.feed_forward.w1 (170, 64):\n    diffusion_model.layers.N.feed_forward.w1 (3 keys)" in text
    assert "not a LoRA weight (unknown key form):\n    some_training_step (1 key)" in text
    assert "not matched (10 keys, by reason" in text
    assert report.unmatched_keys == 6 + 3 + 1


def test_fused_and_split_qkv_together_apply_once():
    sd = random_lora_state_dict(DEMO_TRANSFORMER, dialect="diffusers")
    fused = random_lora_state_dict(DEMO_TRANSFORMER, dialect="comfyui")
    sd.update({k: v for k, v in fused.items() if ".qkv." in k})
    plan = _plan(sd)
    assert all(".qkv" not in m for m in plan.model_map)  # the split rows were kept ...
    assert "duplicate of diffusion_model.layers.0.attention.to_" in plan.report.text()  # ... the fused copy reported


@pytest.mark.parametrize("dialect", ["comfyui", "kohya", "diffusers"])
def test_text_encoder_lora_maps_onto_the_clip(dialect):
    sd = random_text_encoder_lora_state_dict(TE_TARGETS, dialect=dialect)
    plan = _plan(sd, clip=CLIP)
    assert set(plan.clip_map.values()) == set(CLIP)  # every loaded layer's linear weights
    text = plan.report.text(1.0, 0.7)
    assert f"text encoder: {len(CLIP)} weights patched" in text
    # The file's last layer is one our encoder never runs: reported as harmless, not applied.
    assert "text encoder's last layer(s): Z-Image reads the second-to-last layer's output" in text
    assert re.search(r"layers[._]N[._]self_attn[._]q_proj \([23] keys\)", text), text


def test_text_encoder_part_without_clip_is_reported_not_applied():
    sd = {**random_lora_state_dict(DEMO_TRANSFORMER, dialect="kohya"),
          **random_text_encoder_lora_state_dict(TE_TARGETS, dialect="kohya")}
    plan = _plan(sd, clip=None)
    assert plan.model_map and not plan.clip_map
    assert "no CLIP connected, not applied" in plan.report.text()
    with pytest.raises(NotZImageLoraError, match="only holds text-encoder"):
        _plan(random_text_encoder_lora_state_dict(TE_TARGETS, dialect="kohya"), clip=None)


FLUX = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 4),
        "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": (4, 3072)}
SDXL = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 640),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": (640, 4),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1280)}
SD15 = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768)}
WAN = {"diffusion_model.blocks.0.cross_attn.k.lora_down.weight": (4, 5120),
       "diffusion_model.blocks.0.self_attn.q.lora_down.weight": (4, 5120)}
QWEN_IMAGE = {"transformer_blocks.0.img_mod.1.lora_down.weight": (4, 3072),
              "transformer_blocks.0.txt_mlp.net.2.lora_up.weight": (3072, 4)}
LUMINA2 = {"diffusion_model.layers.0.attention.qkv.lora_down.weight": (4, 2304),
           "diffusion_model.layers.0.attention.qkv.lora_up.weight": (6912, 4)}
NOT_A_LORA = {"diffusion_model.layers.0.attention.qkv.weight": (192, 64)}


@pytest.mark.parametrize("keys,looks_like", [
    (FLUX, "FLUX.1"), (SDXL, "SDXL"), (SD15, "Stable Diffusion 1.x/2.x"), (WAN, "Wan"), (QWEN_IMAGE, "Qwen-Image"),
    (LUMINA2, "another size"), (NOT_A_LORA, "no LoRA weights"), ({}, "empty file")])
def test_other_models_loras_are_refused_naming_what_they_look_like(keys, looks_like):
    with pytest.raises(NotZImageLoraError) as e:
        plan_lora(keys, {}, name="other.safetensors", model_shapes=MODEL, clip_shapes=CLIP)
    message = str(e.value)
    assert message.startswith("LoRA other.safetensors is not a Z-Image LoRA") and looks_like in message
    assert "Nothing was applied" in message


def test_a_few_z_image_keys_in_a_flux_file_do_not_make_it_apply():
    keys = {**FLUX, "diffusion_model.layers.0.attention.out.lora_down.weight": (4, DIM),
            "diffusion_model.layers.0.attention.out.lora_up.weight": (DIM, 4)}
    with pytest.raises(NotZImageLoraError, match="FLUX"):
        plan_lora(keys, {}, name="mixed.safetensors", model_shapes=MODEL)


@pytest.mark.parametrize("config,scale", [
    ({"lora_alpha": 2, "r": 4}, 0.5),
    ({"lora_alpha": 8, "r": 4, "use_rslora": True}, 4.0),  # PEFT's rsLoRA: alpha / sqrt(r)
    ({"lora_alpha": 2, "r": 4, "alpha_pattern": {"attention.to_q": 4}}, None)])
def test_peft_metadata_alpha_scales_modules_without_alpha_tensors(config, scale):
    import json

    sd = random_lora_state_dict(DEMO_TRANSFORMER, dialect="peft")
    meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    plan = plan_lora({k: tuple(v.shape) for k, v in sd.items()}, {}, name="x.safetensors", model_shapes=MODEL,
                     metadata=meta)
    scales = {h.module + h.part: h.scale for h in plan.report.hits}
    if scale is not None:
        assert set(scales.values()) == {scale}
    else:  # the pattern's alpha for to_q only
        assert {s for m, s in scales.items() if m.endswith("qkvq")} == {1.0}
        assert {s for m, s in scales.items() if not m.endswith("qkvq")} == {0.5}
    assert "PEFT metadata" in plan.report.text()
    assert len(plan.extra_alphas) == len(plan.model_map)


def _plan_as_node(sd: dict, metadata=None, name="bad.safetensors", clip=None):
    """As ZImageLoraLoader calls plan_lora: alphas from the one-number `.alpha` tensors only."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    alphas = {k: float(v.item()) for k, v in sd.items() if k.endswith(".alpha") and v.numel() == 1}
    return plan_lora(shapes, alphas, name=name, model_shapes=MODEL, metadata=metadata, clip_shapes=clip)


def _one_module_broken(edit) -> tuple[dict, str]:
    """A kohya LoRA (with alphas) whose first layers.0 qkv-split module is changed by `edit(sd, module)`."""
    sd = random_lora_state_dict(DEMO_TRANSFORMER, dialect="kohya", rank=4, alpha=2.0)
    module = sorted(k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight"))[0]
    edit(sd, module)
    return sd, module


BROKEN = {
    "up/down rank mismatch": (lambda sd, m: sd.__setitem__(m + ".lora_up.weight", torch.zeros(
        sd[m + ".lora_up.weight"].shape[0], 3)), "up has rank 3 but down has rank 4"),
    "rank 0": (lambda sd, m: sd.update({m + ".lora_up.weight": torch.zeros(sd[m + ".lora_up.weight"].shape[0], 0),
                                        m + ".lora_down.weight": torch.zeros(0, DIM)}), "rank 0"),
    "alpha of shape [3]": (lambda sd, m: sd.__setitem__(m + ".alpha", torch.ones(3)),
                           "its alpha holds 3 values (shape (3,)), not one number"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_damaged_module_is_reported_not_applied(case):
    """A module ComfyUI's adapter could not build (it would skip it with a log line) is not counted as patched:
    the report lists it with the reason; every other module is applied."""
    edit, reason = BROKEN[case]
    sd, module = _one_module_broken(edit)
    plan = _plan_as_node(sd)
    assert module not in plan.model_map and len(plan.model_map) == len(_one_module_broken(lambda *_: None)[0]) // 3 - 1
    text = plan.report.text(1.0)
    assert "damaged: " in text and reason in text, text
    keys = [k for k in sd if k.startswith(module + ".")]
    assert f"not matched: {len(keys)}" in text


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_lora_with_only_damaged_modules_is_refused_naming_file_key_and_fix(case):
    edit, reason = BROKEN[case]
    sd = random_lora_state_dict(DEMO_TRANSFORMER, dialect="kohya", rank=4, alpha=2.0)
    for m in {k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")}:
        edit(sd, m)
    with pytest.raises(NotZImageLoraError, match=r"LoRA bad.safetensors cannot be applied: module 'lora_unet_") as e:
        _plan_as_node(sd)
    assert "download it again" in str(e.value) and "damaged" in str(e.value)


@pytest.mark.parametrize(("config", "field"), [
    ({"lora_alpha": "x", "r": 4}, "lora_alpha = 'x'"),
    ({"lora_alpha": 4, "r": -4, "use_rslora": True}, "r = -4"),
    ({"lora_alpha": 4, "r": 0}, "r = 0"),
    ({"lora_alpha": float("nan"), "r": 4}, "lora_alpha = nan"),
    ({"lora_alpha": 4, "r": 4, "rank_pattern": {"layers.0.attention.to_q": "8"}}, "rank_pattern['layers.0.attention.to_q'] = '8'"),
    ({"lora_alpha": 4, "r": 4, "alpha_pattern": [1, 2]}, "alpha_pattern = [1, 2]"),
])
def test_unusable_peft_metadata_is_refused_naming_the_field(config, field):
    import json

    sd = random_lora_state_dict(DEMO_TRANSFORMER, dialect="peft", rank=4)
    metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    with pytest.raises(NotZImageLoraError) as e:
        _plan_as_node(sd, metadata)
    message = str(e.value)
    assert message.startswith("LoRA bad.safetensors: its PEFT metadata (lora_adapter_metadata) has " + field), message
    assert "Re-save the LoRA" in message


def test_a_5000_digit_layer_index_is_unmatched_not_an_integer_error():
    sd = random_lora_state_dict(DEMO_TRANSFORMER, dialect="kohya", rank=4, alpha=2.0)
    huge = "9" * 5000
    for kind in ("lora_unet_layers_", "lora_te_model_layers_"):
        for suffix, shape in ((".lora_down.weight", (4, DIM)), (".lora_up.weight", (DIM, 4))):
            sd[f"{kind}{huge}_self_attn_q_proj{suffix}"] = torch.zeros(shape)
    plan = _plan_as_node(sd, clip=CLIP)
    text = plan.report.text(1.0)
    assert "not matched: 4" in text and huge not in text
    # Only such keys: refused with a short message (the index is cut, not printed 5000 digits long).
    only = {k: v for k, v in sd.items() if huge in k}
    with pytest.raises(NotZImageLoraError) as e:
        _plan_as_node(only, clip=CLIP)
    assert len(str(e.value)) < 1000
