"""FLUX.1 VAE: parity with diffusers and ComfyUI on the same random weights, loading, tiling, errors."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from tests import vae_fixtures as fx
from zimage_core import CheckpointError
from zimage_core.vae import (
    LATENT_SCALE,
    LATENT_SHIFT,
    FluxVAE,
    denormalize_latents,
    load_vae,
    normalize_latents,
)
from zimage_core.vae import flux_vae as zvae

REL_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def ref():
    return fx.make_diffusers_vae(seed=0)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    return {
        "bfl": fx.write_bfl_file(d / "ae.safetensors", ref),
        "diffusers": fx.write_diffusers_folder(d / "vae", ref),
        "dir": d,
    }


@pytest.fixture(scope="module")
def ours(files):
    return load_vae(files["bfl"])


def images(b=2, h=32, w=48, seed=1):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def latents(b=2, h=4, w=6, seed=2):
    return torch.randn(b, 16, h, w, generator=torch.Generator().manual_seed(seed))


def diffusers_encode(ref, x):
    with torch.no_grad():
        mean = ref.encode(x.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
    return (mean - ref.config.shift_factor) * ref.config.scaling_factor


def diffusers_decode_signed(ref, z):
    """diffusers decoder output in [-1, 1] scale (before the [0,1] map and clamp)."""
    with torch.no_grad():
        return ref.decode(z / ref.config.scaling_factor + ref.config.shift_factor).sample


# --------------------------------------------------------------------------- key names


def test_bfl_fixture_names_invert_diffusers_reference_mapping(ref):
    """Our fixture's diffusers->BFL renaming is exactly undone by diffusers' own convert_ldm_vae_checkpoint."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    bfl = fx.bfl_state_dict(ref)
    back = convert_ldm_vae_checkpoint(bfl, dict(ref.config))
    sd = ref.state_dict()
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k].reshape(v.shape), v), k


def test_parameter_names_are_bfl_and_load_into_comfyui_strict(ref, ours):
    bfl = fx.bfl_state_dict(ref)
    assert set(ours.state_dict()) == set(bfl)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in bfl.items()}
    fx.comfy_encoder_decoder(bfl)  # loads our BFL names strictly into ComfyUI's own modules


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("fmt", ["bfl", "diffusers"])
def test_encode_matches_diffusers(ref, files, fmt):
    vae = load_vae(files[fmt])
    x = images()
    got, want = vae.encode(x), diffusers_encode(ref, x)
    assert got.shape == (2, 16, 4, 6) and got.dtype == torch.float32
    assert rel_err(got, want) <= REL_TOL


@pytest.mark.parametrize("fmt", ["bfl", "diffusers"])
def test_decode_matches_diffusers(ref, files, fmt):
    vae = load_vae(files[fmt])
    z = latents()
    got = vae.decode(z)
    signed = diffusers_decode_signed(ref, z)
    assert got.shape == (2, 32, 48, 3) and got.dtype == torch.float32
    # Compare on the decoder's own [-1,1] scale, where the random-weight signal is not swamped by the 0.5 offset.
    assert (signed.abs() < 1).all(), "fixture output clamped; the comparison would be vacuous"
    assert rel_err(got.permute(0, 3, 1, 2) * 2 - 1, signed) <= REL_TOL
    assert torch.allclose(got, (signed / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), atol=1e-6)


def test_encode_decode_match_comfyui_native(ref, ours):
    mods = fx.comfy_encoder_decoder(fx.bfl_state_dict(ref))
    enc, dec = mods
    _, latent_formats = fx.comfy_modules()
    flux = latent_formats.Flux()
    x, z = images(), latents()
    with torch.no_grad():
        # ComfyUI: VAE.encode -> moments -> mean (DiagonalGaussianRegularizer, sample=False); the sampler
        # then applies latent_format.process_in.
        want_z = flux.process_in(enc(x.permute(0, 3, 1, 2) * 2 - 1)[:, :16])
        want_img = dec(flux.process_out(z))
    assert rel_err(ours.encode(x), want_z) <= REL_TOL
    assert rel_err(ours.decode(z).permute(0, 3, 1, 2) * 2 - 1, want_img) <= REL_TOL


def test_comfyui_ops_as_operations(ref, files):
    """ComfyUI passes its comfy.ops classes (weights cast per call); outputs must not change."""
    from tests.comfyui_reference import import_comfy

    comfy_ops = import_comfy("comfy.ops")
    vae = load_vae(files["bfl"], operations=comfy_ops.manual_cast)
    assert isinstance(vae.decoder.conv_in, comfy_ops.manual_cast.Conv2d)
    assert isinstance(vae.decoder.norm_out, comfy_ops.manual_cast.GroupNorm)
    x = images(b=1)
    assert rel_err(vae.encode(x), diffusers_encode(ref, x)) <= REL_TOL


def test_latent_normalization_matches_comfyui_and_diffusers_config(ref):
    assert (LATENT_SCALE, LATENT_SHIFT) == (ref.config.scaling_factor, ref.config.shift_factor)
    raw = torch.randn(1, 16, 4, 4)
    assert torch.allclose(denormalize_latents(normalize_latents(raw)), raw, atol=1e-6)
    mods = fx.comfy_modules()
    flux = mods[1].Flux()
    assert torch.allclose(normalize_latents(raw), flux.process_in(raw), atol=1e-7)
    assert torch.allclose(denormalize_latents(raw), flux.process_out(raw), atol=1e-7)


def test_rgba_drops_alpha_and_channels_last_model_matches(ref, files):
    vae = load_vae(files["bfl"], channels_last=True)
    assert vae.is_channels_last
    x = images(b=1)
    rgba = torch.cat([x, torch.rand(1, 32, 48, 1)], dim=-1)
    want = diffusers_encode(ref, x)
    assert rel_err(vae.encode(rgba), want) <= REL_TOL
    z = latents(b=1)
    assert rel_err(vae.decode(z).permute(0, 3, 1, 2) * 2 - 1, diffusers_decode_signed(ref, z)) <= REL_TOL


# --------------------------------------------------------------------------- loading


def test_loads_full_checkpoint_with_prefix_and_other_models(ref, files):
    path = fx.write_bfl_file(files["dir"] / "full.safetensors", ref, prefix="first_stage_model.",
                             extra={"model.diffusion_model.x_embedder.weight": torch.zeros(4, 4)})
    vae = load_vae(path)
    x = images(b=1)
    assert rel_err(vae.encode(x), diffusers_encode(ref, x)) <= REL_TOL


def test_pipeline_root_folder_finds_vae_subfolder(ref, files):
    root = files["dir"] / "Z-Image-Turbo"
    (root / "vae").mkdir(parents=True)
    for f in files["diffusers"].iterdir():
        (root / "vae" / f.name).symlink_to(f)
    vae = load_vae(root)
    x = images(b=1)
    assert rel_err(vae.encode(x), diffusers_encode(ref, x)) <= REL_TOL


def test_dtype_and_meta_build(files):
    vae = load_vae(files["bfl"], dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in vae.parameters())
    assert not any(p.requires_grad for p in vae.parameters())
    out = vae.decode(latents(b=1))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_operations_namespace_is_used(files):
    made = []

    class Conv2d(torch.nn.Conv2d):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    ops = types.SimpleNamespace(Conv2d=Conv2d, GroupNorm=torch.nn.GroupNorm, Linear=torch.nn.Linear)
    vae = load_vae(files["bfl"], operations=ops)
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m, Conv2d) for m in convs) and len(made) == len(convs)


def test_sd_vae_is_rejected(files):
    path = fx.write_sd_vae(files["dir"] / "sdxl_vae.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_vae(path)
    msg = str(e.value)
    assert "sdxl_vae.safetensors" in msg and "4 latent channels" in msg and "ae.safetensors" in msg


@pytest.mark.parametrize("writer,needle", [(fx.write_transformer_file, "transformer"),
                                           (fx.write_text_encoder_file, "text encoder")])
def test_other_model_files_are_rejected(files, writer, needle):
    path = writer(files["dir"] / f"{needle.replace(' ', '_')}.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_vae(path)
    msg = str(e.value)
    assert path.name in msg and needle in msg and "FLUX.1 VAE" in msg and "ae.safetensors" in msg


def test_truncated_file_is_rejected(files):
    path = fx.truncate(files["bfl"], files["dir"] / "ae_partial.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_vae(path)
    assert "ae_partial.safetensors" in str(e.value) and "download" in str(e.value).lower()


# --------------------------------------------------------------------------- bad tensors


def test_size_not_divisible_by_8(ours):
    with pytest.raises(ValueError, match=r"60x44 .*not a multiple of 8.*56x40"):
        ours.encode(torch.rand(1, 44, 60, 3))


@pytest.mark.parametrize("shape", [(1, 48, 64, 1), (1, 48, 64, 2), (1, 3, 48, 64)])
def test_wrong_image_channels(ours, shape):
    with pytest.raises(ValueError, match="colour channels"):
        ours.encode(torch.rand(shape))


def test_wrong_latent_channels(ours):
    with pytest.raises(ValueError, match="SD1.5/SDXL VAE"):
        ours.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        ours.decode(torch.randn(16, 8, 8))


# --------------------------------------------------------------------------- tiling


def _error_jumps(tiled: torch.Tensor, whole: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |step| of the tiling error field between neighbouring columns / rows.

    A seam is a line where the error changes abruptly, so it shows as a spike in these profiles.
    """
    d = (tiled - whole)[0]
    return (d[:, 1:] - d[:, :-1]).abs().mean(dim=(0, 2)), (d[1:] - d[:-1]).abs().mean(dim=(1, 2))


def test_tiled_decode_close_and_seamless(ours):
    # 16x24 latents (128x192 px) in 12-cell tiles overlapping by 4: 2x3 tiles. Tiling is approximate
    # because every GroupNorm normalizes with per-tile statistics and the decoder's receptive field is
    # far wider than the overlap. Measured on this fixture: MAE 2.9% of the image's std, max 1.7/255.
    z = latents(b=1, h=16, w=24, seed=3)
    whole = ours.decode(z, tiled=False)
    tiled = ours.decode(z, tiled=True, tile_size=12, overlap=4)
    err = (tiled - whole).abs()
    assert err.mean() < 0.05 * whole.std()
    assert err.max() < 3 / 255
    jx, jy = _error_jumps(tiled, whole)
    # Measured max/median ratios: 2.3 (x) / 1.7 (y) with the feather blend; 17 / 12 with hard tile
    # edges (overlap 0), which the second half checks so this detector is known to see seams.
    assert jx.max() < 5 * jx.median() and jy.max() < 5 * jy.median()
    hard = ours.decode(z, tiled=True, tile_size=12, overlap=0)
    hx, hy = _error_jumps(hard, whole)
    assert hx.max() > 8 * hx.median() and hy.max() > 8 * hy.median(), "the detector must flag hard tile edges"


def test_tiled_encode_close(ours):
    x = images(b=1, h=128, w=192, seed=4)
    whole = ours.encode(x, tiled=False)
    tiled = ours.encode(x, tiled=True, tile_size=96, overlap=32)
    assert tiled.shape == whole.shape
    # Measured: MAE 3.7% of the latents' std (same GroupNorm-per-tile approximation as decode).
    assert (tiled - whole).abs().mean() < 0.1 * whole.std()


def test_automatic_mode_splits_by_memory(ours, monkeypatch):
    z = latents(b=2, h=6, w=6, seed=5)
    whole = ours.decode(z, tiled=False)
    per_image = ours.memory_used_decode(z[:1].shape)
    # Room for one image but not two: exact per-image decode.
    monkeypatch.setattr(zvae, "_available_bytes", lambda device: int(1.5 * per_image / zvae.FREE_FRACTION))
    assert rel_err(ours.decode(z), whole) <= REL_TOL
    # Room for nothing: tiles (the same result as asking for tiles explicitly).
    monkeypatch.setattr(zvae, "_available_bytes", lambda device: 1)
    auto = ours.decode(z[:1], tile_size=4, overlap=2)
    assert rel_err(auto, ours.decode(z[:1], tiled=True, tile_size=4, overlap=2)) <= REL_TOL
    assert rel_err(auto, whole[:1]) > 1e-4  # really tiled (tiling is approximate)


def test_attention_query_chunking_is_exact(ours, monkeypatch):
    from zimage_core.vae import model as vae_model

    z = latents(b=1, h=6, w=6, seed=6)
    whole = ours.decode(z)
    monkeypatch.setattr(vae_model, "ATTN_CHUNK_BYTES", 7 * 36 * 4)  # 7 queries per chunk (36 tokens)
    assert rel_err(ours.decode(z), whole) <= REL_TOL


def test_old_diffusers_attention_names_load(ref, files):
    """Early diffusers checkpoints name the attention query/key/value/proj_attn."""
    from safetensors.torch import save_file

    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in ref.state_dict().items():
        for new, legacy in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        sd[k] = v.contiguous()
    folder = files["dir"] / "old_vae"
    folder.mkdir()
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    x = images(b=1)
    assert rel_err(load_vae(folder).encode(x), diffusers_encode(ref, x)) <= REL_TOL


def test_memory_estimate_scales(ours):
    est = zvae.estimate_memory
    dec = est("decode", 1024, 1024, dtype=torch.bfloat16)  # the real FLUX AE (default config)
    assert est("decode", 1024, 1024, batch=2, dtype=torch.bfloat16) == pytest.approx(2 * dec, rel=1e-6)
    assert est("decode", 1024, 1024, dtype=torch.float32) == pytest.approx(2 * dec, rel=1e-6)
    assert est("decode", 2048, 2048, dtype=torch.bfloat16) == pytest.approx(4 * dec, rel=1e-6)
    # Activations of the order of a GiB at 1024^2 in bf16, not MiB or 100s of GiB.
    assert 2**29 < dec < 2**33
    assert 0 < est("encode", 1024, 1024, dtype=torch.bfloat16) < dec
    # ComfyUI-style methods take the input tensor's NCHW shape (latents for decode, pixels for encode).
    assert ours.memory_used_decode((2, 16, 40, 24), torch.float32) == est(
        "decode", 320, 192, batch=2, dtype=torch.float32, config=ours.config)
    assert ours.memory_used_encode((2, 3, 320, 192), torch.float32) == est(
        "encode", 320, 192, batch=2, dtype=torch.float32, config=ours.config)


def test_default_config_is_the_flux_ae():
    """Defaults build the real FLUX.1 AE: same parameter names/shapes as diffusers' FLUX config, mapped."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        ours = FluxVAE()
        ref = AutoencoderKL(**{**fx.TINY_CONFIG, "block_out_channels": [128, 256, 512, 512]})
    want = {k: tuple(v.shape) for k, v in fx.diffusers_to_bfl(ref.state_dict(), 4).items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert 83.7e6 < sum(p.numel() for p in ours.parameters()) < 83.9e6  # "83.8M params" (ZIMAGE_FACTS §4)


# --------------------------------------------------------------------------- cancel hooks and bounds


class Interrupted(Exception):
    pass


def _interrupt_after(n: int) -> tuple[list[int], types.FunctionType]:
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) > n:
            raise Interrupted

    return calls, check


def _live_tensors(shape: tuple[int, ...]) -> int:
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and tuple(o.shape) == shape)


@pytest.mark.parametrize("direction", ["decode", "encode"])
def test_check_interrupt_runs_before_each_tile_and_image(ours, direction):
    # 2 images, each 2x2 tiles (24 latent cells with 16-cell tiles overlapping by 4 -> starts 0 and 8).
    if direction == "decode":
        x, run = latents(b=2, h=24, w=24, seed=7), ours.decode
        tiles = {"tile_size": 16, "overlap": 4}
    else:
        x, run = images(b=2, h=192, w=192, seed=7), ours.encode
        tiles = {"tile_size": 128, "overlap": 32}
    calls, check = _interrupt_after(10**6)
    plain = run(x, tiled=True, **tiles)
    assert torch.equal(run(x, tiled=True, check_interrupt=check, **tiles), plain)  # no change in the result
    # Encode: once per tile. Decode: also per decoder block and row band (Cancel inside one tile's decode).
    blocks = len(ours.decoder.up) * len(ours.decoder.up[0].block)
    assert len(calls) == 8 if direction == "encode" else len(calls) >= 8 * (1 + blocks)
    calls, check = _interrupt_after(10**6)
    run(x, tiled=False, check_interrupt=check)
    assert len(calls) == 1 if direction == "encode" else len(calls) >= 1 + blocks  # one pass over the batch


def test_interrupted_tiled_decode_stops_and_frees_its_tiles(ours):
    z = latents(b=2, h=24, w=24, seed=8)
    canvas = (1, 3, 24 * 8, 24 * 8)  # the blended float32 output of one image
    before = _live_tensors(canvas)
    calls, check = _interrupt_after(2)
    with pytest.raises(Interrupted) as info:
        ours.decode(z, tiled=True, tile_size=16, overlap=4, check_interrupt=check)
    assert len(calls) == 3  # stopped at the third tile
    # The caller still holds the exception (ComfyUI keeps it for its report): the canvas is gone anyway.
    assert info.value is not None and _live_tensors(canvas) == before


def test_load_calls_check_interrupt_per_tensor_and_frees_a_partial_model(files):
    import gc

    calls, check = _interrupt_after(10**6)
    model = load_vae(files["bfl"], check_interrupt=check)
    assert len(calls) == len(model.state_dict())
    del model
    gc.collect()
    before = sum(type(o) is FluxVAE for o in gc.get_objects())
    calls, check = _interrupt_after(5)
    with pytest.raises(Interrupted) as info:
        load_vae(files["bfl"], check_interrupt=check)
    gc.collect()
    assert info.value is not None and sum(type(o) is FluxVAE for o in gc.get_objects()) == before


def test_int_latents_are_refused(ours):
    with pytest.raises(ValueError, match="float latents"):
        ours.decode(torch.zeros(1, 16, 4, 4, dtype=torch.int64))


@pytest.mark.parametrize("value", [0, "32", 10**9, 7])
def test_config_json_group_count_is_checked(files, tmp_path, value):
    import json
    import shutil

    folder = shutil.copytree(files["diffusers"], tmp_path / "vae")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "norm_num_groups": value}))
    with pytest.raises(CheckpointError, match="norm_num_groups|ch_mult") as info:
        load_vae(folder)
    assert str(folder / "config.json") in str(info.value)


def test_decode_stops_within_two_seconds_of_cancel_at_2048_on_the_cpu():
    """One 2048² image on the CPU: the decode checks Cancel between decoder blocks and between row bands of
    its convolutions (one convolution there takes seconds), so it stops within 2 s of the request (it ran the
    whole decode before: minutes). A child process: the old behaviour would only time out."""
    import subprocess
    import sys

    code = """
import sys, threading, time, torch
sys.path.insert(0, sys.argv[1])
from zimage_core.demo_weights import DEMO_VAE
from zimage_core.vae import FluxVAE
torch.manual_seed(0)
vae = FluxVAE(DEMO_VAE).eval()
z = torch.randn(1, 16, 256, 256)
asked = []
class Cancelled(Exception):
    pass
def check():
    if asked:
        raise Cancelled
threading.Timer(3.0, lambda: asked.append(time.perf_counter())).start()
try:
    vae.decode(z, check_interrupt=check)
    print("FINISHED")
except Cancelled:
    print("STOPPED", time.perf_counter() - asked[0])
"""
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parents[1])],
                          capture_output=True, text=True, timeout=120)
    assert "STOPPED" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) < 2.0, proc.stdout


def test_banded_decode_equals_the_whole_decode(monkeypatch):
    """The row bands that make Cancel responsive carry their halo rows: the image equals the unbanded one."""
    from zimage_core.demo_weights import DEMO_VAE
    from zimage_core.vae import FluxVAE
    from zimage_core.vae import model as vae_model

    torch.manual_seed(0)
    vae = FluxVAE(DEMO_VAE).eval()
    z = torch.randn(1, 16, 12, 20)
    whole = vae.decode(z)
    monkeypatch.setattr(vae_model, "BAND_ELEMENTS", 500)
    checks = []
    banded = vae.decode(z, check_interrupt=lambda: checks.append(1))
    assert len(checks) > 100
    torch.testing.assert_close(banded, whole, rtol=0, atol=1e-5)
