"""Inpainting in the node graph: masks (LoadImage / mask editor, SetLatentNoiseMask, VAEEncodeForInpaint, our
MASK input) handled as KSampler handles them, and the composite that leaves every unmasked pixel untouched."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.comfy_harness import (
    INPAINT,
    comfy,
    comfy_module,
    demo_prompt,
    fresh_run,
    nodes_of,
    run_ok,
    saved_images,
)
from zimage_core.demo_weights import DEMO_FILES

# KSampler's "simple" schedule equals Turbo's when 1000 is a multiple of the steps (as in test_comfy_core_types).
STEPS = 8
PAINTED = "zimage_inpaint_painted.png"  # 80x72 RGBA, transparent (= painted) where to repaint
CLIPSPACE = "clipspace/clipspace-painted-masked-1.png"  # where the mask editor saves its result
SMALL = "zimage_inpaint_64x48.png"  # sides multiples of 16 (VAEEncodeForInpaint crops to multiples of 8)


def _picture(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x * y) % 97 * 2], -1).astype(np.uint8)


def _painted(width: int, height: int, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """An RGBA picture whose alpha is 0 in the painted rectangle (what the mask editor writes), and that region."""
    rgb = _picture(width, height)
    painted = np.zeros((height, width), bool)
    painted[rows, cols] = True
    alpha = np.where(painted, 0, 255).astype(np.uint8)
    return np.dstack([rgb, alpha]), painted


@pytest.fixture(scope="module")
def images():
    c = comfy()
    big, big_painted = _painted(80, 72, slice(21, 44), slice(27, 53))  # edges off the 8- and 16-px grids
    Image.fromarray(big, "RGBA").save(c.input_dir / PAINTED)
    (c.input_dir / "clipspace").mkdir(exist_ok=True)
    Image.fromarray(big, "RGBA").save(c.input_dir / CLIPSPACE)
    small, _ = _painted(64, 48, slice(8, 40), slice(24, 56))  # 8-px aligned, not 16-px aligned
    Image.fromarray(small, "RGBA").save(c.input_dir / SMALL)
    return {"rgb": big[..., :3], "painted": big_painted}


@pytest.fixture(scope="module")
def pack(images):
    nodes = comfy_module("nodes")
    ours = nodes.NODE_CLASS_MAPPINGS
    model = ours["ZImageModelLoader"]().load(DEMO_FILES["diffusion_models"], "default")[0]
    clip = ours["ZImageTextEncoderLoader"]().load(DEMO_FILES["text_encoders"])[0]
    vae = ours["ZImageVAELoader"]().load(DEMO_FILES["vae"])[0]
    (cond,) = nodes.CLIPTextEncode().encode(clip, "a red boat")
    return nodes, model, cond, vae


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square dilation by r pixels (max over a (2r+1)² window), written independently of the pack."""
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


# --- the shipped workflow, through ComfyUI's executor -------------------------------------------------------


@pytest.mark.parametrize("grow, feather", [(0, 0), (6, 3)])
def test_workflow_changes_no_pixel_outside_the_grown_feathered_mask(images, grow, feather):
    prompt = demo_prompt(INPAINT, seed=5, ZImageInpaintMask__grow=grow, ZImageInpaintMask__feather=feather)
    (load,) = nodes_of(prompt, "LoadImage")
    prompt[load]["inputs"]["image"] = PAINTED
    (out,) = saved_images(run_ok(prompt))  # loaders may come from ComfyUI's cache; the rest runs again
    source = images["rgb"]
    assert out.shape == source.shape  # the 80x72 picture, though sampling ran on its 80x64 centre crop
    reach = _dilate(images["painted"], grow + feather)
    assert np.array_equal(out[~reach], source[~reach]), "a pixel outside the mask changed"
    changed = np.abs(out.astype(int) - source).sum(-1) > 0
    assert changed[images["painted"]].mean() > 0.5, "the painted area was not repainted"


def test_mask_editor_result_loads_from_clipspace(images):
    """The mask editor saves the painted picture under input/clipspace and LoadImage reads it from there."""
    prompt = demo_prompt(INPAINT, seed=5, ZImageInpaintMask__grow=0, ZImageInpaintMask__feather=0)
    (load,) = nodes_of(prompt, "LoadImage")
    prompt[load]["inputs"]["image"] = PAINTED
    (direct,) = saved_images(fresh_run(prompt))
    prompt[load]["inputs"]["image"] = f"{CLIPSPACE} [input]"
    (clipspace,) = saved_images(run_ok(prompt))  # a new LoadImage input: everything after it runs again
    assert np.array_equal(direct, clipspace)
    assert not np.array_equal(clipspace, images["rgb"])


def test_unpainted_image_comes_back_unchanged_with_a_note(images, caplog):
    """LoadImage of a picture without alpha gives a 64x64 all-zero MASK: it is resized to the picture (with a
    note), nothing is repainted, and the output is the input, pixel for pixel."""
    prompt = demo_prompt(INPAINT, seed=5)  # the harness's RGB test picture
    with caplog.at_level(logging.WARNING):
        (out,) = saved_images(fresh_run(prompt))
    source = np.asarray(Image.open(comfy().input_dir / prompt[nodes_of(prompt, "LoadImage")[0]]["inputs"]["image"])
                        .convert("RGB"))
    assert np.array_equal(out, source)
    assert "was resized" in caplog.text and "the mask is empty" in caplog.text


# --- node path against KSampler ------------------------------------------------------------------------------


def _load(nodes, name):
    return nodes.LoadImage().load_image(name)


def test_turbo_sampler_with_a_mask_is_ksampler_with_set_latent_noise_mask(pack):
    nodes, model, cond, vae = pack
    ours = nodes.NODE_CLASS_MAPPINGS
    image, mask = _load(nodes, SMALL)
    (latent,) = ours["ZImageVAEEncode"]().encode(vae, image)
    (masked,) = nodes.SetLatentNoiseMask().set_mask(latent, mask)
    expected = nodes.KSampler().sample(model, 7, STEPS, 1.0, "euler", "simple", cond, cond, masked, 1.0)[0]["samples"]
    turbo = ours["ZImageTurboSampler"]()
    from_noise_mask = turbo.sample(model, cond, masked, 7, STEPS, 3.0, 0.0)[0]["samples"]
    from_mask_input = turbo.sample(model, cond, latent, 7, STEPS, 3.0, 0.0, mask=mask)[0]["samples"]
    torch.testing.assert_close(from_noise_mask, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_mask_input, expected, rtol=1e-5, atol=1e-5)
    # Latent columns 0-2 (pixels 0-23) are outside the mask: the source comes back there.
    torch.testing.assert_close(expected[..., :3], latent["samples"][..., :3], rtol=1e-4, atol=1e-4)
    assert (expected[..., 3:] - latent["samples"][..., 3:]).abs().mean() > 0.05


@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_img2img_sampler_with_a_mask_is_ksampler_advanced(pack, strength):
    """Img2img at `strength` starts at step int(8 − 8·strength) of the 8-step grid: KSamplerAdvanced's
    start_at_step, with the same noise (add_noise) and the mask as the latent's noise_mask."""
    nodes, model, cond, vae = pack
    ours = nodes.NODE_CLASS_MAPPINGS
    image, mask = _load(nodes, SMALL)
    (latent,) = ours["ZImageVAEEncode"]().encode(vae, image)
    (masked,) = nodes.SetLatentNoiseMask().set_mask(latent, mask)
    start = int(STEPS - STEPS * strength)
    expected = nodes.KSamplerAdvanced().sample(model, "enable", 9, STEPS, 1.0, "euler", "simple", cond, cond, masked,
                                               start, 10000, "disable")[0]["samples"]
    got = ours["ZImageImg2ImgSampler"]().sample(model, cond, latent, strength, 9, STEPS, 3.0, mask=mask)[0]["samples"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_vae_encode_for_inpaint_noise_mask_is_honoured_like_ksampler(pack):
    nodes, model, cond, vae = pack
    image, mask = _load(nodes, SMALL)
    (latent,) = nodes.VAEEncodeForInpaint().encode(vae, image, mask, 6)
    assert "noise_mask" in latent
    expected = nodes.KSampler().sample(model, 3, STEPS, 1.0, "euler", "simple", cond, cond, latent, 1.0)[0]["samples"]
    got = nodes.NODE_CLASS_MAPPINGS["ZImageTurboSampler"]().sample(model, cond, latent, 3, STEPS, 3.0, 0.0)[0]
    torch.testing.assert_close(got["samples"], expected, rtol=1e-5, atol=1e-5)


def test_node_inpaint_equals_zimage_core_sample_inpaint(pack):
    """The node path (KSampler's masking) and zimage_core.sample_inpaint (diffusers' pipeline, tested against
    it in test_inpaint.py) agree for a binary mask on the latent grid."""
    from zimage_core.sampling import latent_inpaint_mask, make_noise, sample_inpaint
    from zimage_core.transformer import load_transformer
    from zimage_core.vae import denormalize_latents, normalize_latents

    nodes, model, cond, vae = pack
    image, mask = _load(nodes, SMALL)
    (latent,) = nodes.NODE_CLASS_MAPPINGS["ZImageVAEEncode"]().encode(vae, image)
    node = nodes.NODE_CLASS_MAPPINGS["ZImageImg2ImgSampler"]().sample(model, cond, latent, 0.75, 11, STEPS, 3.0,
                                                                      mask=mask)[0]["samples"]
    raw = latent["samples"]
    transformer = load_transformer(comfy().models_dir / "diffusion_models" / DEMO_FILES["diffusion_models"],
                                   dtype=torch.float32)
    core = sample_inpaint(transformer, [cond[0][0][0].float()], normalize_latents(raw),
                          make_noise(tuple(raw.shape), 11), latent_inpaint_mask(mask, raw.shape[-2:]), strength=0.75)
    torch.testing.assert_close(node, denormalize_latents(core).float(), rtol=1e-5, atol=1e-5)


# --- all-zero / all-one masks, sizes ---------------------------------------------------------------------------


def test_all_zero_mask_returns_the_source_latent(pack):
    nodes, model, cond, vae = pack
    image, _ = _load(nodes, SMALL)
    (latent,) = nodes.NODE_CLASS_MAPPINGS["ZImageVAEEncode"]().encode(vae, image)
    zero = torch.zeros(1, 48, 64)
    for node, args in (("ZImageTurboSampler", (1, STEPS, 3.0, 0.0)), ("ZImageImg2ImgSampler", (0.6, 1, STEPS, 3.0))):
        out = nodes.NODE_CLASS_MAPPINGS[node]().sample(model, cond, latent, *args, mask=zero)[0]["samples"]
        assert torch.equal(out, latent["samples"]), node


def test_all_one_mask_is_plain_img2img(pack):
    nodes, model, cond, vae = pack
    image, _ = _load(nodes, SMALL)
    (latent,) = nodes.NODE_CLASS_MAPPINGS["ZImageVAEEncode"]().encode(vae, image)
    sampler = nodes.NODE_CLASS_MAPPINGS["ZImageImg2ImgSampler"]()
    plain = sampler.sample(model, cond, latent, 0.6, 2, STEPS, 3.0)[0]["samples"]
    full = sampler.sample(model, cond, latent, 0.6, 2, STEPS, 3.0, mask=torch.ones(1, 48, 64))[0]["samples"]
    assert torch.equal(full, plain)


def test_a_mask_of_another_size_is_resized_with_a_note(pack, caplog):
    nodes, model, cond, vae = pack
    image, _ = _load(nodes, SMALL)
    (latent,) = nodes.NODE_CLASS_MAPPINGS["ZImageVAEEncode"]().encode(vae, image)
    small = torch.zeros(1, 12, 16)
    small[:, :, 8:] = 1.0  # the right half, at a quarter of the size
    full = torch.zeros(1, 48, 64)
    full[:, :, 32:] = 1.0
    sampler = nodes.NODE_CLASS_MAPPINGS["ZImageTurboSampler"]()
    with caplog.at_level(logging.WARNING):
        resized = sampler.sample(model, cond, latent, 4, STEPS, 3.0, 0.0, mask=small)[0]
    assert "the mask is 16x12 but the latent's image is 64x48; the mask was resized" in caplog.text
    exact = sampler.sample(model, cond, latent, 4, STEPS, 3.0, 0.0, mask=full)[0]
    assert resized["noise_mask"].shape == (1, 1, 48, 64)
    torch.testing.assert_close(resized["samples"], exact["samples"], rtol=1e-5, atol=1e-5)


def test_grow_feather_and_composite_nodes(images):
    nodes = comfy_module("nodes")
    ours = nodes.NODE_CLASS_MAPPINGS
    mask = torch.zeros(1, 40, 40)
    mask[:, 10:20, 12:22] = 1.0
    grown = ours["ZImageInpaintMask"]().prepare(mask, 3, 0)[0]
    assert torch.equal(grown[0] > 0, torch.from_numpy(_dilate(mask[0].numpy() > 0, 3)))
    shrunk = ours["ZImageInpaintMask"]().prepare(mask, -2, 0)[0]
    assert int(shrunk.sum()) == 6 * 6
    soft = ours["ZImageInpaintMask"]().prepare(mask, 4, 4)[0]
    assert torch.equal(soft[0] > 0, torch.from_numpy(_dilate(mask[0].numpy() > 0, 8)))
    assert float(soft[0, 15, 17]) == 1.0 and 0 < float(soft[0, 10 - 4, 17]) < 1
    # The composite: a 16-multiple crop of a 40x40 source (32x32 at offset 4) goes back in its place.
    source = torch.rand(1, 40, 40, 3, generator=torch.Generator().manual_seed(1))
    generated = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(2))
    (out,) = ours["ZImageInpaintComposite"]().composite(source, generated, soft)
    assert out.shape == source.shape
    outside = (soft[0] == 0)
    assert torch.equal(out[0][outside], source[0][outside])
    inside = soft[0] == 1
    assert torch.equal(out[0, 4:36, 4:36][inside[4:36, 4:36]], generated[0][inside[4:36, 4:36]])
    with pytest.raises(ValueError, match="MASK"):
        ours["ZImageInpaintComposite"]().composite(source, generated, torch.zeros(2, 3, 4, 5))


def _mask_module(nodes):
    import sys

    return sys.modules[type(nodes["ZImageInpaintMask"]()).__module__]


@pytest.mark.parametrize("grow, feather", [(3, 0), (-4, 0), (0, 5), (7, 7), (-3, 12), (40, 40)])
def test_inpaint_mask_is_a_square_dilation_then_a_cut_off_gaussian(monkeypatch, grow, feather):
    """The node's definition, written with scipy on the whole image in float64: a max (min) over the
    (2|grow|+1)² window, edges replicated, then a Gaussian of σ = feather/2 cut off at ±feather along rows then
    columns. Small chunks here, so every chunk seam is crossed; pixels out of reach stay exactly 0."""
    from scipy import ndimage

    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    monkeypatch.setattr(_mask_module(nodes), "CHUNK_ELEMENTS", 700)
    g = torch.Generator().manual_seed(grow * 31 + feather)
    mask = (torch.rand(2, 61, 97, generator=g) > 0.97).float()
    mask[0, 20:35, 30:60] = 1.0
    mask[1, 5:9, 80:95] = 0.5
    given = mask.clone()
    (out,) = nodes["ZImageInpaintMask"]().prepare(mask, grow, feather)
    assert torch.equal(mask, given)  # the input MASK is not changed
    ref = mask.double().numpy()
    if grow:
        op = ndimage.grey_dilation if grow > 0 else ndimage.grey_erosion
        ref = np.stack([op(m, size=(2 * abs(grow) + 1,) * 2, mode="nearest") for m in ref])
    if feather:
        t = np.arange(-feather, feather + 1)
        k = np.exp(-0.5 * (t / (feather / 2)) ** 2)
        k /= k.sum()
        ref = ndimage.correlate1d(ndimage.correlate1d(ref, k, axis=2, mode="nearest"), k, axis=1, mode="nearest")
        reach = np.stack([ndimage.grey_dilation(m, size=(2 * feather + 1,) * 2, mode="nearest") for m in
                          (ref > 1e-12) | (mask.numpy() > 0)])
        assert (out.numpy()[~reach] == 0).all()
    np.testing.assert_allclose(out.numpy(), np.clip(ref, 0, 1), atol=2e-6)


def test_inpaint_mask_stops_on_cancel():
    import comfy.model_management as mm

    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            nodes["ZImageInpaintMask"]().prepare(torch.ones(1, 64, 64), 4, 4)
    finally:
        mm.interrupt_current_processing(False)


def test_inpaint_mask_needs_about_one_copy_of_the_mask():
    """Peak memory above the process's size before the call, at 3072² with grow and feather 64 (its input is
    36 MiB): about one float32 copy plus small chunks (the whole-image version needed 447 MiB, 12 copies)."""
    from scripts.comfy_headless import default_comfyui_dir
    from tests.limited_child import run_limited

    result = run_limited("""
        import types
        from pathlib import Path
        sys.path.insert(0, {comfyui!r})
        from comfy.cli_args import args
        args.cpu = True
        import comfy.model_management  # noqa: F401
        for name, path in (("zpack", Path({root!r})), ("zpack.nodes", Path({root!r}) / "nodes")):
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module
        import importlib
        inpaint = importlib.import_module("zpack.nodes.inpaint")
        n = 3072
        mask = torch.zeros(1, n, n)
        mask[:, n // 4:n // 2, n // 3:n // 2] = 1.0
        def status(field):
            return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        before = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")
        out = inpaint.ZImageInpaintMask().prepare(mask, 64, 64)[0]
        report(peak=status("VmHWM") - before, mask=mask.numel() * 4, ok=bool(out[0, n // 3, 5 * n // 12] > 0.999 and out[0, 0, 0] == 0))
    """.replace("{root!r}", repr(str(Path(__file__).resolve().parents[1])))
       .replace("{comfyui!r}", repr(str(default_comfyui_dir()))), timeout=600, extra_bytes=8 << 30)
    assert result["status"] == "ok", result
    assert result["ok"], result
    assert result["peak"] < 2 * result["mask"], f"peak {result['peak'] / 2**20:.0f} MiB for a " \
        f"{result['mask'] / 2**20:.0f} MiB mask"
