"""Fun ControlNet Union against diffusers 0.42.1 (ZImageControlNetModel + ZImageTransformer2DModel and the
ControlNet / ControlNet-inpaint pipelines), on tiny random weights written in every published layout.

Files are written with the published tensor names and shapes (alibaba-pai single files, diffusers
folders); diffusers' own single-file conversion and layout detection read the same files, so the
names are checked by the reference, not by us.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImageControlNetModel, ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_z_image_controlnet_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)
from safetensors.torch import load_file, save_file

from zimage_core.controlnet import (
    ControlRun,
    detect_layout,
    load_controlnet,
    random_controlnet_state_dict,
    write_random_controlnet,
)
from zimage_core.controlnet.loading import diffusers_config
from zimage_core.controlnet.model import ControlHooks
from zimage_core.errors import CheckpointError
from zimage_core.transformer import load_transformer

DIM, HEADS = 64, 2
TOL = 1e-5
MAIN = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=DIM, n_layers=30, n_refiner_layers=2,
            n_heads=HEADS, n_kv_heads=HEADS, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0,
            t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[256, 32, 32])
# layout written → (our layout name, diffusers' single-file model type)
LAYOUTS = {
    "1.0": ("1.0", "z-image-turbo-controlnet"),
    "2.0-broken": ("2.0", "z-image-turbo-controlnet-2.0"),
    "2.0": ("2.0", "z-image-turbo-controlnet-2.0"),
    "2.1": ("2.1", "z-image-turbo-controlnet-2.1"),
    "tile": ("2.1", "z-image-turbo-controlnet-2.1"),
    "lite": ("lite", None),  # diffusers has no single-file entry for lite (its folder config says it)
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def main_models(tmp_path_factory):
    ref = ZImageTransformer2DModel(**MAIN)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    folder = tmp_path_factory.mktemp("main") / "transformer"
    ref.eval().save_pretrained(folder, safe_serialization=True)
    return ref, load_transformer(folder, dtype=torch.float32)


def _inputs(b: int = 2, h: int = 8, w: int = 12, cap: int = 20, channels: int = 33):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, 16, h, w, generator=g)
    caps = [torch.randn(cap, 32, generator=g) for _ in range(b)]
    control = torch.randn(b, channels, h, w, generator=g)
    return x, caps, control


def _diffusers_velocity(ref, controlnet, x, sigma, caps, control, scale):
    t = torch.full((x.shape[0],), 1.0 - sigma)
    with torch.no_grad():
        samples = None if controlnet is None else controlnet(
            list(x.unsqueeze(2).unbind(0)), t, caps, list(control.unsqueeze(2).unbind(0)), conditioning_scale=scale)
        out = ref(list(x.unsqueeze(2).unbind(0)), t, caps, controlnet_block_samples=samples, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def _ours_velocity(ours, net, x, sigma, caps, control, scale, style="diffusers"):
    cfg = ours.config
    run = ControlRun(net, control, scale, style=style, axes_dims=cfg.axes_dims, rope_theta=cfg.rope_theta)
    with torch.no_grad():
        return ours(x, torch.full((x.shape[0],), sigma), caps, hooks=ControlHooks(ours, [run]))


@pytest.mark.parametrize("written", list(LAYOUTS))
def test_every_layout_matches_diffusers(written, main_models, tmp_path):
    ref, ours = main_models
    name, diffusers_type = LAYOUTS[written]
    single = write_random_controlnet(tmp_path / "cn.safetensors", written, dim=DIM, n_heads=HEADS, seed=7,
                                     dtype=torch.float32, std=0.05)
    folder = write_random_controlnet(tmp_path / "cn_folder", written, dim=DIM, n_heads=HEADS, seed=7,
                                     dtype=torch.float32, std=0.05, folder=True)
    sd = load_file(str(single))
    if diffusers_type is not None:
        assert infer_diffusers_model_type(sd) == diffusers_type
    # The reference on the single file, the way diffusers' from_single_file converts it.
    config = diffusers_config(written, DIM, HEADS)
    reference = ZImageControlNetModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    reference.load_state_dict(convert_z_image_controlnet_checkpoint_to_diffusers(dict(sd), config), strict=True)
    reference = ZImageControlNetModel.from_transformer(reference.eval(), ref)
    channels = reference.config.control_in_dim
    x, caps, control = _inputs(channels=channels)
    expected = _diffusers_velocity(ref, reference, x, 0.6, caps, control, 0.8)
    plain = _diffusers_velocity(ref, reference, x, 0.6, caps, control, 0.0)
    assert _rel(expected, plain) > 1e-3  # the control really changes the output
    for path in (single, folder):
        net, layout = load_controlnet(path, dtype=torch.float32)
        assert layout.name == name
        got = _ours_velocity(ours, net, x, 0.6, caps, control, 0.8)
        assert _rel(got, expected) < TOL, f"{written} {path.name}: {_rel(got, expected)}"
    # diffusers' own loader reads the folder we wrote
    from_folder = ZImageControlNetModel.from_pretrained(folder)
    torch.testing.assert_close(from_folder.control_all_x_embedder["2-1"].weight,
                               reference.control_all_x_embedder["2-1"].weight)


# -- Z-Image Base files and the Turbo 2.1 updates (2601, 2602) -----------------------------------------------
# alibaba-pai's VideoX-Fun runs every 2.1 file, Base or Turbo, with one of two configs (config/z_image/
# z_image_control_2.1.yaml and z_image_control_2.1_lite.yaml; its Base example predict_t2i_control_2.1_lite.py
# loads Z-Image-Fun-Controlnet-Union-2.1-lite.safetensors with the lite one); their values, as diffusers'
# ZImageControlNetModel takes them:
VIDEOX_FUN_2_1 = dict(control_layers_places=list(range(0, 30, 2)), control_refiner_layers_places=[0, 1],
                      add_control_noise_refiner="control_noise_refiner", control_in_dim=33)
VIDEOX_FUN_2_1_LITE = dict(VIDEOX_FUN_2_1, control_layers_places=[0, 10, 20])
BASE = "Z-Image (Base)"
TURBO = "Z-Image-Turbo"
# published file name → (tensor layout written, our layout, family, release)
PUBLISHED_FILES = {
    "Z-Image-Fun-Controlnet-Union-2.1.safetensors": ("2.1", "2.1", BASE, ""),
    "Z-Image-Fun-Controlnet-Union-2.1-lite.safetensors": ("lite", "lite", BASE, ""),
    "Z-Image-Fun-Controlnet-Tile-2.1-lite.safetensors": ("lite", "lite", BASE, ""),
    "Z-Image-Turbo-Fun-Controlnet-Union-2.1-2601-8steps.safetensors": ("2.1", "2.1", TURBO, "2601"),
    "Z-Image-Turbo-Fun-Controlnet-Union-2.1-lite-2601-8steps.safetensors": ("lite", "lite", TURBO, "2601"),
    "Z-Image-Turbo-Fun-Controlnet-Union-2.1-2602-8steps.safetensors": ("2.1", "2.1", TURBO, "2602"),
    "Z-Image-Turbo-Fun-Controlnet-Union-2.1-lite-2602-8steps.safetensors": ("lite", "lite", TURBO, "2602"),
}


@pytest.mark.parametrize("file_name", list(PUBLISHED_FILES))
def test_base_and_turbo_2601_2602_files_load_as_their_layouts_and_match_diffusers(file_name, main_models, tmp_path):
    """Base and Turbo 2.1 files have the same tensors (diffusers' own single-file detection calls the 15-layer
    ones "z-image-turbo-controlnet-2.1"); the layout comes from the tensors, the family from the name. The
    reference is diffusers' ZImageControlNetModel configured with VideoX-Fun's config values (above)."""
    ref, ours = main_models
    written, name, family, release = PUBLISHED_FILES[file_name]
    path = write_random_controlnet(tmp_path / file_name, written, dim=DIM, n_heads=HEADS, seed=13,
                                   dtype=torch.float32, std=0.05)
    sd = load_file(str(path))
    if written == "2.1":
        assert infer_diffusers_model_type(sd) == "z-image-turbo-controlnet-2.1"
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("control_layers.")})
    n_refiner = len({k.split(".")[1] for k in sd if k.startswith("control_noise_refiner.")})
    assert (n_layers, n_refiner) == ((15, 2) if written == "2.1" else (3, 2))  # the model cards' counts
    config = VIDEOX_FUN_2_1 if written == "2.1" else VIDEOX_FUN_2_1_LITE
    net, layout = load_controlnet(path, dtype=torch.float32)
    assert (layout.name, layout.family, layout.release) == (name, family, release)
    assert list(layout.config.layer_places) == config["control_layers_places"]
    assert list(layout.config.refiner_places) == config["control_refiner_layers_places"]
    assert family in layout.describe() and ("Tile" in layout.describe()) == ("Tile" in file_name)
    reference = ZImageControlNetModel(dim=DIM, n_heads=HEADS, n_kv_heads=HEADS, n_refiner_layers=2, **config)
    reference.load_state_dict(convert_z_image_controlnet_checkpoint_to_diffusers(dict(sd), reference.config),
                              strict=True)
    reference = ZImageControlNetModel.from_transformer(reference.eval(), ref)
    x, caps, control = _inputs()
    expected = _diffusers_velocity(ref, reference, x, 0.4, caps, control, 0.9)
    assert _rel(expected, _diffusers_velocity(ref, reference, x, 0.4, caps, control, 0.0)) > 1e-3
    got = _ours_velocity(ours, net, x, 0.4, caps, control, 0.9)
    assert _rel(got, expected) < TOL, _rel(got, expected)


def _videox_fun_velocity(ref, cn, x, sigma, caps, control, scale):
    """alibaba-pai VideoX-Fun's ZImageControlTransformer2DModel.forward for 2.x files (add_control_noise_refiner,
    add_control_noise_refiner_correctly), written here from its code, on diffusers' blocks through forward hooks:
    - the control latent is patchified and embedded, its padding rows set to the model's x_pad_token;
    - refiner stage: every control_noise_refiner block runs once, before the noise refiner, on that stream with x
      = the noise refiner's input; hint j is added (× scale) to the MODEL's tokens after noise_refiner block
      control_refiner_layers_places[j] (diffusers instead adds them to a private copy the control tower uses);
    - main stage: the control layers run on [refined control stream; refined caption] with x = the main blocks'
      input (the unified sequence); hint k is added (× scale) after main block control_layers_places[k].
    Left out (not used here): sequence parallelism, gradient checkpointing, captions of different lengths."""
    places = list(cn.config.control_layers_places)
    refiner_places = list(cn.config.control_refiner_layers_places)
    state, handles = {}, []

    def before_refiner(module, args):
        x0, mask, freqs, adaln = args[:4]
        tokens = cn.patchify(list(control.unsqueeze(2).unbind(0)), 2, 1)
        c = cn.control_all_x_embedder["2-1"](torch.stack(tokens))
        n_img = (control.shape[-2] // 2) * (control.shape[-1] // 2)
        c[:, n_img:] = ref.x_pad_token
        for block in cn.control_noise_refiner:
            c = block(c, x0, mask, freqs, adaln)
        *state["refiner_hints"], state["control"] = torch.unbind(c)

    def after_refiner(j):
        def hook(module, args, out):
            return out + state["refiner_hints"][refiner_places.index(j)] * scale if j in refiner_places else out
        return hook

    def before_main(module, args):
        unified, mask, freqs, adaln = args[:4]
        c = torch.cat([state["control"], unified[:, state["control"].shape[1]:]], 1)
        for block in cn.control_layers:
            c = block(c, unified, mask, freqs, adaln)
        state["hints"] = torch.unbind(c)[:-1]

    def after_main(i):
        def hook(module, args, out):
            return out + state["hints"][places.index(i)] * scale if i in places else out
        return hook

    handles.append(ref.noise_refiner[0].register_forward_pre_hook(before_refiner))
    handles += [b.register_forward_hook(after_refiner(j)) for j, b in enumerate(ref.noise_refiner)]
    handles.append(ref.layers[0].register_forward_pre_hook(before_main))
    handles += [b.register_forward_hook(after_main(i)) for i, b in enumerate(ref.layers)]
    try:
        return _diffusers_velocity(ref, None, x, sigma, caps, control, scale)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("file_name", ["Z-Image-Fun-Controlnet-Union-2.1.safetensors",
                                       "Z-Image-Fun-Controlnet-Union-2.1-lite.safetensors"], ids=["base", "base-lite"])
def test_videox_fun_reference_on_base_files(file_name, main_models, tmp_path):
    ref, ours = main_models
    written = PUBLISHED_FILES[file_name][0]
    path = write_random_controlnet(tmp_path / file_name, written, dim=DIM, n_heads=HEADS, seed=17,
                                   dtype=torch.float32, std=0.05)
    config = VIDEOX_FUN_2_1 if written == "2.1" else VIDEOX_FUN_2_1_LITE
    cn = ZImageControlNetModel(dim=DIM, n_heads=HEADS, n_kv_heads=HEADS, n_refiner_layers=2, **config)
    cn.load_state_dict(convert_z_image_controlnet_checkpoint_to_diffusers(load_file(str(path)), cn.config),
                       strict=True)
    cn = ZImageControlNetModel.from_transformer(cn.eval(), ref)
    x, caps, control = _inputs()
    with torch.no_grad():
        expected = _videox_fun_velocity(ref, cn, x, 0.7, caps, control, 0.8)
        plain = _videox_fun_velocity(ref, cn, x, 0.7, caps, control, 0.0)
        via_diffusers = _diffusers_velocity(ref, cn, x, 0.7, caps, control, 0.8)
    assert _rel(expected, plain) > 1e-3
    assert _rel(expected, via_diffusers) > 1e-4  # the refiner hints' destination really differs
    net, _ = load_controlnet(path, dtype=torch.float32)
    got = _ours_velocity(ours, net, x, 0.7, caps, control, 0.8, style="videox")
    assert _rel(got, expected) < TOL, _rel(got, expected)
    assert _rel(_ours_velocity(ours, net, x, 0.7, caps, control, 0.8), via_diffusers) < TOL


def test_the_family_in_the_metadata_wins_over_a_renamed_file(tmp_path):
    path = write_random_controlnet(tmp_path / "my_controlnet.safetensors", "lite", dim=DIM, n_heads=HEADS,
                                   metadata={"modelspec.title": "Z-Image-Fun-Controlnet-Union-2.1-lite"})
    assert load_controlnet(path)[1].family == BASE
    plain = write_random_controlnet(tmp_path / "my_other_controlnet.safetensors", "lite", dim=DIM, n_heads=HEADS)
    assert load_controlnet(plain)[1].family is None


@pytest.mark.parametrize("layers,refiner,channels", [(14, 2, 33), (15, 1, 33), (2, 2, 33), (5, 2, 16)],
                         ids=["14-layers", "1-refiner", "2-layers", "1.0-5-layers"])
def test_a_cut_short_layout_is_refused_naming_the_file(layers, refiner, channels, tmp_path):
    layout = "1.0" if channels == 16 else "2.1"
    sd = random_controlnet_state_dict(layout, dim=DIM, n_heads=HEADS)
    sd = {k: v for k, v in sd.items()
          if not (k.startswith("control_layers.") and int(k.split(".")[1]) >= layers)
          and not (k.startswith("control_noise_refiner.") and int(k.split(".")[1]) >= refiner)}
    path = tmp_path / "Z-Image-Fun-Controlnet-Union-2.1.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=f"(?s){path.name}.*published .* layout.*{layers} control layers "
                                              f"and {refiner} refiner blocks.*cut short"):
        load_controlnet(path)


def test_broken_2_0_file_keeps_its_untrained_refiner_out(tmp_path):
    path = write_random_controlnet(tmp_path / "b.safetensors", "2.0-broken", dim=DIM, n_heads=HEADS)
    layout = detect_layout(load_file(str(path)), path)
    assert (layout.name, layout.untrained_refiner, layout.config.refiner) == ("2.0", True, "control_layers")
    trained = write_random_controlnet(tmp_path / "t.safetensors", "2.1", dim=DIM, n_heads=HEADS)
    assert detect_layout(load_file(str(trained)), trained).config.layer_places == tuple(range(0, 30, 2))
    lite = write_random_controlnet(tmp_path / "l.safetensors", "lite", dim=DIM, n_heads=HEADS)
    assert detect_layout(load_file(str(lite)), lite).config.layer_places == (0, 10, 20)
    one = write_random_controlnet(tmp_path / "o.safetensors", "1.0", dim=DIM, n_heads=HEADS)
    assert detect_layout(load_file(str(one)), one).config.layer_places == (0, 5, 10, 15, 20, 25)


def test_a_transformer_file_in_the_controlnet_loader_names_both(main_models, tmp_path):
    from zimage_core.demo_weights import write_random_transformer
    from zimage_core.transformer import TransformerConfig

    path = write_random_transformer(tmp_path / "dit.safetensors", TransformerConfig(
        dim=64, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=(8, 12, 12)))
    with pytest.raises(CheckpointError, match="Z-Image diffusion transformer.*Z-Image Model Loader"):
        load_controlnet(path)


def test_a_controlnet_file_in_the_model_loader_names_both(tmp_path):
    path = write_random_controlnet(tmp_path / "cn.safetensors", "2.1", dim=DIM, n_heads=HEADS)
    with pytest.raises(CheckpointError, match="Fun ControlNet.*ControlNet Loader"):
        load_transformer(path)


# -- the pipelines: ZImageControlNetPipeline / ZImageControlNetInpaintPipeline, end to end -----------------

class _ControlDenoiser:
    """Our transformer + ControlRun as the samplers' Denoiser (what the ComfyUI nodes do through patches)."""

    def __init__(self, ours, net, control, scale):
        self.ours, self.dtype, self.device = ours, torch.float32, torch.device("cpu")
        cfg = ours.config
        self.run = ControlRun(net, control, scale, style="diffusers", axes_dims=cfg.axes_dims,
                              rope_theta=cfg.rope_theta)

    def __call__(self, x, sigma, caps):
        with torch.no_grad():
            return self.ours(x, sigma, caps, hooks=ControlHooks(self.ours, [self.run]))


def _vae_encode(vae):
    def encode(pixels: torch.Tensor) -> torch.Tensor:  # (B, H, W, 3) in [0, 1] → scaled latents, as the pipelines
        with torch.no_grad():
            z = vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mode()
        return (z - vae.config.shift_factor) * vae.config.scaling_factor
    return encode


# Base: ZImageControlNetPipeline with CFG (guidance 4, a negative prompt, normalisation, truncation) and the
# control on both halves of the CFG batch, as Z-Image Base is sampled; the layout is the Base files' (2.1/lite).
BASE_CFG = dict(guidance=4.0, cfg_normalization=True, cfg_truncation=0.6)


@pytest.mark.parametrize("written,inpaint,cfg", [("1.0", False, False), ("2.1", False, False), ("2.1", True, False),
                                                 ("lite", True, False), ("2.1", True, True)],
                         ids=["1.0", "2.1", "2.1-inpaint", "lite-inpaint", "base-inpaint-cfg"])
def test_pipelines_match_our_sampler(written, inpaint, cfg, main_models, tmp_path):
    from diffusers import ZImageControlNetInpaintPipeline, ZImageControlNetPipeline

    from tests.sampling_fixtures import build_flux_vae, zimage_scheduler
    from zimage_core import make_noise, sample_text_to_image
    from zimage_core.controlnet import control_latents

    ref, ours = main_models
    folder = write_random_controlnet(tmp_path / "cn", written, dim=DIM, n_heads=HEADS, seed=5, dtype=torch.float32,
                                     std=0.05, folder=True)
    controlnet = ZImageControlNetModel.from_pretrained(folder).eval()
    vae = build_flux_vae(seed=1)
    g = torch.Generator().manual_seed(8)
    control_px = torch.rand(1, 16, 24, 3, generator=g)
    image_px = torch.rand(1, 16, 24, 3, generator=g)
    mask = torch.rand(1, 16, 24, generator=g)  # soft: the pipeline binarizes at 0.5
    caps = [torch.randn(20, 32, generator=g)]
    negative = [torch.randn(40, 32, generator=g)]  # padded to 64 tokens, the prompt to 32: a masked batch
    noise = make_noise((1, 16, 8, 12), 5)
    kwargs = dict(prompt_embeds=caps, latents=noise.clone(), height=16, width=24, num_inference_steps=4,
                  guidance_scale=0.0, controlnet_conditioning_scale=0.7, output_type="latent",
                  control_image=control_px.movedim(-1, 1) * 2 - 1)
    ours_cfg = {}
    if cfg:
        kwargs.update(guidance_scale=BASE_CFG["guidance"], negative_prompt_embeds=negative,
                      cfg_normalization=BASE_CFG["cfg_normalization"], cfg_truncation=BASE_CFG["cfg_truncation"])
        ours_cfg = dict(BASE_CFG, negative=negative)
    common = dict(scheduler=zimage_scheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=ref,
                  controlnet=controlnet)
    if inpaint:
        pipe = ZImageControlNetInpaintPipeline(**common)
        kwargs.update(image=image_px.movedim(-1, 1) * 2 - 1, mask_image=mask[:, None])
    else:
        pipe = ZImageControlNetPipeline(**common)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(**kwargs).images
    net, _ = load_controlnet(folder, dtype=torch.float32)
    control = control_latents(_vae_encode(vae), net.config.in_channels, control_image=control_px,
                              inpaint_image=image_px if inpaint else None, mask=mask if inpaint else None,
                              style="diffusers")
    got = sample_text_to_image(_ControlDenoiser(ours, net, control, 0.7), caps, noise, steps=4, **ours_cfg)
    without = sample_text_to_image(_ControlDenoiser(ours, net, control, 0.0), caps, noise, steps=4, **ours_cfg)
    assert _rel(expected, without) > 1e-3
    print(f"{written} inpaint={inpaint} cfg={cfg}: max-abs {float((got - expected).abs().max()):.2e}, "
          f"rel {_rel(got, expected):.2e}")
    assert _rel(got, expected) < TOL, _rel(got, expected)
