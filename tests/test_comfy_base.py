"""Z-Image (Base) sampling in the real ComfyUI: our sampler nodes with guidance, cfg_normalization and
cfg_truncation against diffusers 0.42.1's ZImagePipeline (fp32, CPU, a tiny random model written as a
ComfyUI file), the Base preset, and CFG's negative pass batched with the positive one as in KSampler.
"""

from __future__ import annotations

import gc

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

from tests.comfy_harness import comfy, comfy_module, patched_weights
from tests.transformer_fixtures import make_diffusers_model, write_comfy_file

FILE = "zimage_base_cfg_tiny.safetensors"
SEED, PIXELS = 17, 64
POS_LENGTHS, NEG_LENGTHS = (7, 12), (5, 9)  # a batch of 2, prompts of different lengths
BASE_PRESET = "Z-Image Base (30 steps, shift 6, CFG 4)"
TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _features(lengths, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 32, generator=g) for n in lengths]


def _conditioning(features: list[torch.Tensor]):
    """One CONDITIONING entry for the batch, as a text encoder gives prompts of different lengths: padded
    to the longest, with the attention mask marking each prompt's tokens."""
    longest = max(f.shape[0] for f in features)
    cond = torch.zeros(len(features), longest, features[0].shape[1])
    mask = torch.zeros(len(features), longest, dtype=torch.long)
    for i, f in enumerate(features):
        cond[i, :f.shape[0]] = f
        mask[i, :f.shape[0]] = 1
    return [[cond, {"pooled_output": None, "attention_mask": mask}]]


@pytest.fixture(scope="module")
def base_setup():
    c = comfy()
    path = c.models_dir / "diffusion_models" / FILE
    reference = make_diffusers_model(seed=6)
    write_comfy_file(reference, path)
    nodes = comfy_module("nodes")
    model = nodes.NODE_CLASS_MAPPINGS["ZImageModelLoader"]().load(FILE, "default")[0]
    pos, neg = _features(POS_LENGTHS, 1), _features(NEG_LENGTHS, 2)
    yield nodes, model, reference, pos, neg
    comfy_module("comfy.model_management").unload_all_models()
    gc.collect()
    path.unlink(missing_ok=True)


def _diffusers(reference, pos, neg, *, steps: int, shift: float, guidance: float, **options) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=reference)
    pipe.set_progress_bar_config(disable=True)
    noise = comfy_module("comfy.sample").prepare_noise(torch.zeros(len(pos), 16, PIXELS // 8, PIXELS // 8), SEED)
    with torch.no_grad():
        return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, latents=noise, height=PIXELS, width=PIXELS,
                    num_inference_steps=steps, guidance_scale=guidance, output_type="latent", **options).images


def _ours(nodes, model, pos, neg, **inputs) -> torch.Tensor:
    latent = nodes.NODE_CLASS_MAPPINGS["ZImageEmptyLatent"]().generate(PIXELS, PIXELS, "custom", len(pos))[0]
    defaults = {"seed": SEED, "steps": 30, "shift": 6.0, "guidance": 0.0}
    out = nodes.NODE_CLASS_MAPPINGS["ZImageTurboSampler"]().sample(
        model, _conditioning(pos), latent, negative=_conditioning(neg), **{**defaults, **inputs})[0]
    # As diffusers returns it: the model's latent space.
    return comfy_module("comfy.latent_formats").Flux().process_in(out["samples"])


_CACHE: dict = {}
# The tiny random model barely listens to its prompts: the largest guidance the widget takes makes the norm cap bite.
GRID_GUIDANCE = 20.0
GRID_STEPS = 10  # Base's shift 6; with truncation 0.5 the last step runs unguided


@pytest.mark.parametrize("normalization", [0.0, 1.0], ids=["norm-off", "norm-on"])
@pytest.mark.parametrize("truncation", [1.0, 0.5], ids=["trunc-1.0", "trunc-0.5"])
def test_cfg_options_match_zimage_pipeline(base_setup, normalization, truncation):
    """Each combination of the two options, on Base's schedule (shift 6): the latents of diffusers'
    ZImagePipeline (scheduler shift 6, as Z-Image's scheduler config) within 1e-5."""
    nodes, model, reference, pos, neg = base_setup
    options = {"cfg_normalization": normalization, "cfg_truncation": truncation}
    expected = _diffusers(reference, pos, neg, steps=GRID_STEPS, shift=6.0, guidance=GRID_GUIDANCE, **options)
    got = _ours(nodes, model, pos, neg, steps=GRID_STEPS, shift=6.0, guidance=GRID_GUIDANCE, **options)
    err = _rel(got, expected)
    print(f"norm {normalization} trunc {truncation}: ours vs ZImagePipeline {err:.2e}")
    assert got.shape == expected.shape == (2, 16, PIXELS // 8, PIXELS // 8)
    assert err <= TOL
    _CACHE[normalization, truncation] = got
    # Each option changes the result (so the comparison covers it doing something): by over ten times TOL
    # (truncation 0.5 alone leaves one of the 10 steps unguided: 3e-4).
    if (0.0, 1.0) in _CACHE and (normalization, truncation) != (0.0, 1.0):
        assert _rel(got, _CACHE[0.0, 1.0]) > 10 * TOL


def test_base_preset_matches_zimage_pipeline_at_30_steps_shift_6_guidance_4(base_setup):
    nodes, model, reference, pos, neg = base_setup
    expected = _diffusers(reference, pos, neg, steps=30, shift=6.0, guidance=4.0)
    # Widgets left at Turbo's values: the preset overrides steps, shift and guidance.
    got = _ours(nodes, model, pos, neg, steps=8, shift=3.0, guidance=0.0, preset=BASE_PRESET)
    assert _rel(got, expected) <= TOL
    assert _rel(got, _diffusers(reference, pos, neg, steps=30, shift=6.0, guidance=0.0)) > 1e-3  # guided


def test_guidance_without_options_and_its_batch_of_two_per_step(base_setup):
    """Plain CFG: ZImagePipeline's result; and, as with KSampler, the negative prompt is computed in the same
    model call as the positive one (a batch of 2 per image) when both prompts have the same length, while
    a truncated step runs the positive prompt alone."""
    nodes, model, reference, _, _ = base_setup
    pos, neg = _features([9], 3), _features([9], 4)
    expected = _diffusers(reference, pos, neg, steps=8, shift=3.0, guidance=2.5)
    assert _rel(_ours(nodes, model, pos, neg, steps=8, shift=3.0, guidance=2.5), expected) <= TOL

    batches: list[int] = []

    def record(executor, x, *args, **kwargs):
        batches.append(x.shape[0])
        return executor(x, *args, **kwargs)

    counted = model.clone()
    counted.add_wrapper_with_key(comfy_module("comfy.patcher_extension").WrappersMP.DIFFUSION_MODEL, "count", record)
    _ours(nodes, counted, pos, neg, steps=8, shift=3.0, guidance=2.5, cfg_truncation=0.5)
    # 8 steps at shift 3: sigma 0.3 (1 - sigma = 0.7 > 0.5) is the only truncated step.
    assert batches == [2] * 7 + [1]


def test_img2img_sampler_takes_guidance_and_the_options(base_setup):
    """ZImageImg2ImgSampler at strength 1 is text-to-image from the source's noise: with guidance and both
    options it gives the text-to-image sampler's latent."""
    nodes, model, _, pos, neg = base_setup
    latent = nodes.NODE_CLASS_MAPPINGS["ZImageEmptyLatent"]().generate(PIXELS, PIXELS, "custom", 2)[0]
    options = {"guidance": 3.0, "cfg_normalization": 1.0, "cfg_truncation": 0.6}
    img2img = nodes.NODE_CLASS_MAPPINGS["ZImageImg2ImgSampler"]().sample(
        model, _conditioning(pos), latent, 1.0, SEED, 8, 3.0, negative=_conditioning(neg), **options)[0]
    t2i = nodes.NODE_CLASS_MAPPINGS["ZImageTurboSampler"]().sample(
        model, _conditioning(pos), latent, SEED, 8, 3.0, negative=_conditioning(neg), **options)[0]
    torch.testing.assert_close(img2img["samples"], t2i["samples"], rtol=0, atol=0)
    unguided = nodes.NODE_CLASS_MAPPINGS["ZImageImg2ImgSampler"]().sample(
        model, _conditioning(pos), latent, 1.0, SEED, 8, 3.0)[0]
    assert _rel(img2img["samples"], unguided["samples"]) > 1e-3


@pytest.mark.parametrize("inputs, message", [
    ({"guidance": 4.0, "negative": None}, "needs a negative conditioning"),
    ({"guidance": 4.0, "cfg_truncation": 1.5}, "cfg_truncation must be between 0.0 and 1.0"),
    ({"guidance": 4.0, "cfg_normalization": -1.0}, "cfg_normalization must be a finite number >= 0"),
    ({"preset": "Z-Image Ultra"}, "unknown preset 'Z-Image Ultra'"),
])
def test_bad_guidance_inputs_are_refused_with_a_clear_message(base_setup, inputs, message):
    nodes, model, _, pos, neg = base_setup
    latent = nodes.NODE_CLASS_MAPPINGS["ZImageEmptyLatent"]().generate(PIXELS, PIXELS, "custom", 1)[0]
    kwargs = {"negative": _conditioning(neg[:1]), **inputs}
    with pytest.raises(ValueError, match=message):
        nodes.NODE_CLASS_MAPPINGS["ZImageTurboSampler"]().sample(model, _conditioning(pos[:1]), latent, SEED, 2,
                                                                 3.0, **{"guidance": 0.0, **kwargs})


# --- Fun-Distill LoRAs (alibaba-pai Z-Image-Fun-Lora-Distill: 2/4/8 steps, no CFG, for Z-Image Base) -----------
#
# Key names read from alibaba-pai's training code (VideoX-Fun scripts/z_image/train_distill_lora.py and
# videox_fun/utils/lora_utils.py): PEFT LoRA on the modules matching to_q, to_k, to_v, feed_forward.w1/w2/w3 of
# every block (layers, noise_refiner, context_refiner), lora_alpha = rank (scale 1), saved through
# convert_peft_lora_to_kohya_lora: `lora_unet__layers_0_attention_to_q.lora_down.weight` (a double underscore),
# no alpha tensors. The "-ComfyUI" files are the same weights in names ComfyUI reads: written here both ways
# ComfyUI reads them, diffusers names under `diffusion_model.` (split q/k/v) and ComfyUI's own fused qkv
# (the q/k/v downs stacked, the ups block-diagonal).
DISTILL_LAYOUTS = ("original", "comfyui", "comfyui-fused")
DISTILL_RANK = 4


def _distill_blocks(n_layers: int = 2, n_refiner: int = 1) -> list[str]:
    return ([f"layers.{i}" for i in range(n_layers)]
            + [f"{kind}.{i}" for kind in ("noise_refiner", "context_refiner") for i in range(n_refiner)])


def fun_distill_lora(layout: str, dim: int = 64, ffn: int = 170, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"attention.to_q": (dim, dim), "attention.to_k": (dim, dim), "attention.to_v": (dim, dim),
              "feed_forward.w1": (ffn, dim), "feed_forward.w2": (dim, ffn), "feed_forward.w3": (ffn, dim)}
    out: dict[str, torch.Tensor] = {}
    for block in _distill_blocks():
        parts = {}
        for module, (rows, cols) in shapes.items():
            down = torch.randn(DISTILL_RANK, cols, generator=g) * 0.3 / cols ** 0.5
            up = torch.randn(rows, DISTILL_RANK, generator=g) * 0.3
            parts[module] = (down, up)
        for module, (down, up) in parts.items():
            if layout == "original":
                name = f"lora_unet__{block}.{module}".replace(".", "_")
                out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
            elif layout == "comfyui" or not module.startswith("attention."):
                prefix = f"diffusion_model.{block}.{module}"
                out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = down, up
        if layout == "comfyui-fused":
            downs = [parts[f"attention.to_{p}"][0] for p in "qkv"]
            ups = [parts[f"attention.to_{p}"][1] for p in "qkv"]
            out[f"diffusion_model.{block}.attention.qkv.lora_down.weight"] = torch.cat(downs)
            out[f"diffusion_model.{block}.attention.qkv.lora_up.weight"] = torch.block_diag(*ups)
    return out


def _expected_distill_weights(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict:
    """The model's weights plus up @ down (scale 1) per module, the q/k/v changes on the fused qkv's rows."""
    out = {k: v.clone() for k, v in base.items()}
    for key in lora:
        if not key.endswith(".lora_down.weight"):
            continue
        flat = key[len("lora_unet__"):-len(".lora_down.weight")]
        delta = lora[key.replace("lora_down", "lora_up")] @ lora[key]
        block = next(b for b in _distill_blocks() if flat.startswith(b.replace(".", "_") + "_"))
        module = flat[len(block) + 1:]
        if module.startswith("attention_to_"):
            row = "qkv".index(module[-1]) * delta.shape[0]
            out[f"{block}.attention.qkv.weight"][row:row + delta.shape[0]] += delta
        else:
            out[f"{block}.feed_forward.{module[-2:]}.weight"] += delta
    return out


@pytest.fixture(scope="module")
def distill_loras(base_setup):
    from zimage_core.demo_weights import write_lora

    folder = comfy().models_dir / "loras"
    paths = {layout: write_lora(folder / f"zimage_fun_distill_{layout}.safetensors", fun_distill_lora(layout))
             for layout in DISTILL_LAYOUTS}
    yield {layout: p.name for layout, p in paths.items()}
    for p in paths.values():
        p.unlink(missing_ok=True)


@pytest.mark.parametrize("layout", DISTILL_LAYOUTS)
def test_fun_distill_lora_loads_in_full_with_its_report(base_setup, distill_loras, layout):
    nodes, model, _, _, _ = base_setup
    plain = patched_weights(model)
    out = nodes.NODE_CLASS_MAPPINGS["ZImageLoraLoader"]().load(model, distill_loras[layout], 1.0)
    patched, report = out["result"][0], out["result"][2]
    print(report)
    n_keys = len(fun_distill_lora(layout))
    assert f"keys matched: {n_keys} of {n_keys}" in report and "not matched: none" in report
    if layout == "original":
        assert "VideoX-Fun (lora_unet__)" in report
    expected = _expected_distill_weights(plain, fun_distill_lora("original"))
    got = patched_weights(patched)
    changed = {k for k in plain if not torch.equal(got[k], plain[k])}
    # q/k/v and the feed-forward of all 4 blocks, nothing else
    assert changed == {f"{b}.{m}.weight" for b in _distill_blocks()
                       for m in ("attention.qkv", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    for k in plain:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=f"{layout}: {k}")
    if layout != "original":
        # ComfyUI's own LoraLoaderModelOnly reads the ComfyUI layouts (0.3.75: the fused one only) the same way.
        theirs = patched_weights(nodes.LoraLoaderModelOnly().load_lora_model_only(model, distill_loras[layout],
                                                                                   1.0)[0])
        if any(not torch.equal(theirs[k], plain[k]) for k in plain):
            for k in plain:
                torch.testing.assert_close(theirs[k], got[k], rtol=1e-5, atol=1e-6, msg=f"{layout}: {k}")
        else:
            assert layout == "comfyui" and _comfy_version() < (0, 18), "ComfyUI did not read the -ComfyUI layout"


def _comfy_version() -> tuple[int, ...]:
    import re

    import comfyui_version

    return tuple(int(x) for x in re.findall(r"\d+", comfyui_version.__version__)[:3])


# --- the shipped Base workflows, on the demo checkpoints ---------------------------------------------------------

def test_base_text_to_image_workflow_runs_with_its_negative_prompt():
    from tests.comfy_harness import BASE_T2I, demo_prompt, fresh_run, nodes_of, saved_images

    prompt = demo_prompt(BASE_T2I, width=64, height=48, seed=5)
    (sampler,) = nodes_of(prompt, "ZImageTurboSampler")
    inputs = prompt[sampler]["inputs"]
    assert (inputs["steps"], inputs["shift"], inputs["guidance"]) == (30, 6.0, 4.0)
    negative_node = inputs["negative"][0]
    assert prompt[negative_node]["class_type"] == "ZImageTextEncode" and prompt[negative_node]["inputs"]["text"]
    (image,) = saved_images(fresh_run(prompt))  # as shipped: 30 guided steps
    assert image.shape == (48, 64, 3)


def test_base_distill_lora_workflow_runs_with_a_fun_distill_file():
    from tests.comfy_harness import BASE_DISTILL_LORA, demo_prompt, fresh_run, nodes_of, run_ok, saved_images
    from zimage_core.demo_weights import write_lora

    path = write_lora(comfy().models_dir / "loras" / "zimage_demo_fun_distill.safetensors",
                      fun_distill_lora("original"))  # the demo transformer's shapes (dim 64, 2 layers)
    try:
        prompt = demo_prompt(BASE_DISTILL_LORA, width=64, height=48, seed=5)
        (lora,) = nodes_of(prompt, "ZImageLoraLoader")
        prompt[lora]["inputs"]["lora_name"] = path.name
        (sampler,) = nodes_of(prompt, "ZImageTurboSampler")
        inputs = prompt[sampler]["inputs"]
        assert (inputs["steps"], inputs["guidance"]) == (8, 0.0) and "negative" not in inputs
        result = fresh_run(prompt)
        (image,) = saved_images(result)
        assert image.shape == (48, 64, 3)
        (report,) = result.outputs[lora]["text"]
        assert "VideoX-Fun (lora_unet__)" in report and "not matched: none" in report
        prompt[lora]["inputs"]["strength_model"] = 0.0
        (plain,) = saved_images(run_ok(prompt))
        assert (image.astype(int) - plain.astype(int)).__abs__().mean() > 0.5, "the LoRA changes the image"
    finally:
        path.unlink(missing_ok=True)


# --- ComfyUI's official Base template (image_z_image, comfyui-workflow-templates of 0.18.1 and later) -------------

def _template() -> dict | None:
    """The installed image_z_image.json (None where this ComfyUI's templates predate Z-Image Base)."""
    import importlib.util
    import json
    from pathlib import Path

    # 0.18.1's templates keep the JSON beside the media; later ones (0.28) in comfyui_workflow_templates_json.
    for package in ("comfyui_workflow_templates_json", "comfyui_workflow_templates_media_image",
                    "comfyui_workflow_templates_media_other", "comfyui_workflow_templates"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / "templates" / "image_z_image.json"
            if path.is_file():
                return json.loads(path.read_text())
    return None


SWAPS = {  # the template's native loaders → ours (input renames)
    "UNETLoader": ("ZImageModelLoader", {"unet_name": "model_name"}),
    "CLIPLoader": ("ZImageTextEncoderLoader", {"clip_name": "text_encoder_name"}),
    "VAELoader": ("ZImageVAELoader", {}),
}


def _template_prompt(template: dict, *, swap: set[str], files: dict[str, str], steps: int, size: tuple[int, int],
                     seed: int) -> dict:
    """The template's subgraph flattened into an API prompt (node ids "<instance>:<inner>", as the frontend
    names them), its proxied widgets (prompt, size, steps, cfg, file names) set from the instance node, and
    the loaders in `swap` replaced by ours."""
    from scripts.comfy_headless import _widget_slots

    classes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    subgraphs = {g["id"]: g for g in template["definitions"]["subgraphs"]}
    (instance,) = [n for n in template["nodes"] if n["type"] in subgraphs]
    graph = subgraphs[instance["type"]]
    names = [name for owner, name in instance["properties"]["proxyWidgets"]]
    values = instance.get("widgets_values") or []
    # 0.18.1's template keeps the proxied widget values on the instance; 0.28's leaves them on the inner nodes
    # (and feeds width/height from a ResolutionSelector outside): then the inner values stand.
    proxied = dict(zip(names, values, strict=True)) if len(values) == len(names) else {}
    overrides = {"width": size[0], "height": size[1], "steps": steps, **files}
    links = {link["id"]: link for link in graph["links"]}
    prompt: dict[str, dict] = {}
    for node in graph["nodes"]:
        if node["type"] in ("MarkdownNote", "Note"):
            continue
        inputs = {name: node["widgets_values"][i]
                  for name, i in _widget_slots(classes[node["type"]], node.get("widgets_values") or [])}
        for entry in node.get("inputs", []):
            link = links.get(entry.get("link"))
            if link is None:
                continue
            if link["origin_id"] == -10:  # the subgraph's input: the instance's widget
                outer = graph["inputs"][link["origin_slot"]]["name"]
                if entry["name"] in overrides:
                    inputs[entry["name"]] = overrides[entry["name"]]
                elif outer in proxied:
                    inputs[entry["name"]] = proxied[outer]
            else:
                inputs[entry["name"]] = [f"{instance['id']}:{link['origin_id']}", link["origin_slot"]]
        kind = node["type"]
        if kind == "KSampler":
            inputs["seed"] = seed
        if kind in swap:
            kind, renames = SWAPS[kind]
            accepted = classes[kind].INPUT_TYPES()["required"]
            inputs = {renames.get(k, k): v for k, v in inputs.items() if renames.get(k, k) in accepted}
        prompt[f"{instance['id']}:{node['id']}"] = {"class_type": kind, "inputs": inputs}
    (out_link,) = [links[i] for i in graph["outputs"][0]["linkIds"]]
    prompt["save"] = {"class_type": "SaveImage", "inputs": {
        "images": [f"{instance['id']}:{out_link['origin_id']}", out_link["origin_slot"]], "filename_prefix": "tpl"}}
    return prompt


def test_official_base_template_runs_with_our_three_loaders():
    """image_z_image as ComfyUI ships it (CLIPTextEncode, EmptySD3LatentImage, ModelSamplingAuraFlow, KSampler
    res_multistep/simple with cfg 4 and an empty negative prompt, VAEDecode) with ZImageModelLoader,
    ZImageTextEncoderLoader and ZImageVAELoader in place of UNETLoader, CLIPLoader and VAELoader, on the demo
    checkpoints (4 steps instead of its 25: CPU time)."""
    from tests.comfy_harness import fresh_run, saved_images
    from zimage_core.demo_weights import DEMO_FILES

    template = _template()
    if template is None:
        pytest.skip("this ComfyUI's workflow templates have no image_z_image (added with Z-Image Base, 2026-01)")
    files = {"unet_name": DEMO_FILES["diffusion_models"], "clip_name": DEMO_FILES["text_encoders"],
             "vae_name": DEMO_FILES["vae"]}
    prompt = _template_prompt(template, swap=set(SWAPS), files=files, steps=4, size=(64, 48), seed=3)
    kinds = sorted(n["class_type"] for n in prompt.values())
    assert kinds == sorted(["ZImageModelLoader", "ZImageTextEncoderLoader", "ZImageVAELoader", "CLIPTextEncode",
                            "CLIPTextEncode", "EmptySD3LatentImage", "ModelSamplingAuraFlow", "KSampler",
                            "VAEDecode", "SaveImage"])
    (image,) = saved_images(fresh_run(prompt))
    assert image.shape == (48, 64, 3)
