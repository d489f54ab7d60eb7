"""No black images: a forced NaN in reduced precision, and latents out of range at VAE decode.

A `double_block` model patch (ComfyUI's block-patch mechanism, as ZImageFunControlnet uses) turns the
hidden states to NaN at one step, but only when the model computes in bfloat16: it stands in for an
fp16/bf16 overflow. The demo model is loaded in bf16 and set to compute in bf16, as on a GPU.
  * on_nan "error" (the default): a clear SamplingError naming the step;
  * on_nan "recompute_fp32": that step is computed again in float32 (the patch sees both dtypes), a
    warning names it, sampling finishes with finite latents close to an un-poisoned bf16 run, and the
    model is left in bf16 as it was.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.comfy_harness import comfy_module
from zimage_core.demo_weights import DEMO_FILES
from zimage_core.sampling import step_of
from zimage_core.vae import DECODE_BOUND, LATENT_SCALE, LATENT_SHIFT

STEPS = 4
BAD_STEP = 2  # 0-based: the third step


def _nodes():
    return comfy_module("nodes").NODE_CLASS_MAPPINGS


def _bf16_model():
    """The demo model stored in bf16 and computing in bf16, as on a GPU with bf16 (on the CPU ComfyUI's rule,
    which the loader follows, computes bf16 weights in fp32)."""
    model = _nodes()["ZImageModelLoader"]().load(DEMO_FILES["diffusion_models"], "bf16")[0]
    model.model.manual_cast_dtype = torch.bfloat16  # what ComfyUI casts the inputs to
    model.model.diffusion_model.compute_dtype = torch.bfloat16
    return model


@pytest.fixture(scope="module")
def parts():
    nodes = _nodes()
    model = _bf16_model()
    clip = nodes["ZImageTextEncoderLoader"]().load(DEMO_FILES["text_encoders"])[0]
    (cond,) = nodes["ZImageTextEncode"]().encode(clip, "a red fox in the snow")
    latent = nodes["ZImageEmptyLatent"]().generate(32, 32, "custom", 1)[0]
    return model, cond, latent


def _poisoned(model, seen: list, at: int = BAD_STEP):
    """A clone whose first main block outputs NaN at step `at` when it runs in reduced precision."""

    def inject(args):
        options = args["transformer_options"]
        step = step_of(float(options["sigmas"][0]), options["sample_sigmas"])
        if args["block_index"] == 0:
            seen.append((step, args["img"].dtype))
            if step == at and args["img"].dtype != torch.float32:
                return {"img": torch.full_like(args["img"], float("nan"))}
        return {}

    patched = model.clone()
    patched.set_model_double_block_patch(inject)
    return patched


def _sample(model, cond, latent, on_nan=None):
    extra = {} if on_nan is None else {"on_nan": on_nan}
    return _nodes()["ZImageTurboSampler"]().sample(model, cond, latent, 3, STEPS, 3.0, 0.0, **extra)[0]["samples"]


def test_default_mode_stops_with_a_clear_error_naming_the_step(parts):
    model, cond, latent = parts
    seen = []
    # The pack's SamplingError is its own module's class under ComfyUI's loader: matched by name.
    with pytest.raises(Exception, match=f"step {BAD_STEP + 1} of {STEPS}.*on_nan to recompute_fp32") as err:
        _sample(_poisoned(model, seen), cond, latent)
    assert type(err.value).__name__ == "SamplingError"
    assert (BAD_STEP, torch.bfloat16) in seen, "the patch did not run in bf16: the test proves nothing"
    assert _nodes()["ZImageTurboSampler"].INPUT_TYPES()["optional"]["on_nan"][1]["default"] == "error"


def test_a_nan_at_the_last_step_is_reported_too(parts):
    """Each step's check is read one step later (no GPU sync per step): the last step's is read after sampling."""
    model, cond, latent = parts
    seen = []
    with pytest.raises(Exception, match=f"step {STEPS} of {STEPS}"):
        _sample(_poisoned(model, seen, at=STEPS - 1), cond, latent)
    assert (STEPS - 1, torch.bfloat16) in seen


def test_recovery_mode_recomputes_the_step_in_fp32_and_continues(parts, caplog):
    model, cond, latent = parts
    flags = [getattr(m, "comfy_cast_weights", False) for m in model.model.diffusion_model.modules()]
    clean = _sample(model, cond, latent)
    seen = []
    with caplog.at_level(logging.WARNING, logger="ComfyUI-ZImage"):
        recovered = _sample(_poisoned(model, seen), cond, latent, on_nan="recompute_fp32")
    assert [d for s, d in seen if s == BAD_STEP] == [torch.bfloat16, torch.float32]
    assert all(d == torch.bfloat16 for s, d in seen if s != BAD_STEP), "only the failing step runs in fp32"
    assert any(f"step {BAD_STEP + 1} of {STEPS}" in r.getMessage() and "float32" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert torch.isfinite(recovered).all()
    # Only one step's precision differs from the clean bf16 run.
    err = (recovered - clean).abs().max() / clean.abs().max()
    assert err < 3e-2, float(err)
    inner = model.model.diffusion_model
    assert inner.compute_dtype in (None, torch.bfloat16) and inner.dtype == torch.bfloat16
    assert [getattr(m, "comfy_cast_weights", False) for m in inner.modules()] == flags, "flags restored"


def test_recovery_mode_reports_weights_that_fail_in_fp32_too(parts):
    model, cond, latent = parts

    def always_nan(args):
        return {"img": torch.full_like(args["img"], float("nan"))} if args["block_index"] == 0 else {}

    patched = model.clone()
    patched.set_model_double_block_patch(always_nan)
    with pytest.raises(Exception, match="step 1 of 4, also when recomputed in float32") as err:
        _sample(patched, cond, latent, on_nan="recompute_fp32")
    assert type(err.value).__name__ == "SamplingError"


def test_decode_clamps_wild_latents_with_a_warning(parts, caplog):
    nodes = _nodes()
    vae = nodes["ZImageVAELoader"]().load(DEMO_FILES["vae"])[0]
    torch.manual_seed(0)
    healthy = torch.randn(1, 16, 4, 4) / LATENT_SCALE + LATENT_SHIFT  # unit-variance normalised latents
    with caplog.at_level(logging.WARNING, logger="ComfyUI-ZImage"):
        (image,) = nodes["ZImageVAEDecode"]().decode(vae, {"samples": healthy})
    assert not [r for r in caplog.records if r.name == "ComfyUI-ZImage"], "healthy latents pass untouched"
    wild = healthy.clone()
    wild[0, 3, 1, 2] = 1e6
    wild[0, 5, 0, 0] = float("nan")
    wild[0, 7, 2, 2] = -float("inf")
    # The bound in raw units, from the FLUX normalisation: |raw − shift| · scale ≤ DECODE_BOUND.
    expected = healthy.clone()
    expected[0, 3, 1, 2] = LATENT_SHIFT + DECODE_BOUND / LATENT_SCALE
    expected[0, 5, 0, 0] = LATENT_SHIFT
    expected[0, 7, 2, 2] = LATENT_SHIFT - DECODE_BOUND / LATENT_SCALE
    with caplog.at_level(logging.WARNING, logger="ComfyUI-ZImage"):
        (fixed,) = nodes["ZImageVAEDecode"]().decode(vae, {"samples": wild})
        (reference,) = nodes["ZImageVAEDecode"]().decode(vae, {"samples": expected})
        (core,) = comfy_module("nodes").VAEDecode().decode(vae, {"samples": wild})
    assert torch.isfinite(fixed).all()
    assert torch.allclose(fixed, reference, atol=1e-6)
    assert torch.allclose(core, reference, atol=1e-4), "core VAEDecode on our VAE is checked too"
    messages = [r.getMessage() for r in caplog.records if r.name == "ComfyUI-ZImage"]
    assert any("ZImageVAEDecode" in m and "1 NaN/inf" not in m and "2 NaN/inf" in m and "clamped" in m
               for m in messages), messages


def _poisoned_always(model):
    """A clone whose first main block outputs NaN at every step, in any dtype (NaN weights stand-in)."""

    def inject(args):
        return {"img": torch.full_like(args["img"], float("nan"))} if args["block_index"] == 0 else {}

    patched = model.clone()
    patched.set_model_double_block_patch(inject)
    return patched


@pytest.mark.parametrize("weight_dtype, computes", [("bf16", "bfloat16"), ("default", "float32"), ("fp16", None)])
def test_nan_message_says_what_to_change_for_the_dtype_in_use(parts, weight_dtype, computes):
    """Only float16 overflows on this model: the message blames fp16 (and suggests bf16) only when the model
    computes in fp16; in bf16 it points at the weights and the fp32 check; in fp32 at the weights alone."""
    _, cond, latent = parts
    model = _bf16_model() if weight_dtype == "bf16" else \
        _nodes()["ZImageModelLoader"]().load(DEMO_FILES["diffusion_models"], weight_dtype)[0]
    with pytest.raises(Exception, match="NaN/inf") as err:
        _sample(_poisoned_always(model), cond, latent)
    message = str(err.value)
    computes = computes or str(model.model.diffusion_model.compute_dtype).replace("torch.", "")
    assert f"computing in {computes}" in message, message
    if computes == "float16":
        assert "compute in bfloat16 (bf16) instead" in message and "weight_dtype default or bf16" in message
    else:
        assert "float16 overflows" not in message and "fp16" not in message
        assert "weight_dtype default or bf16" not in message  # the dtype already in use is not the fix
        assert "LoRA" in message and "NaN/inf weights" in message
    if computes == "bfloat16":
        assert "set on_nan to recompute_fp32" in message
    if computes == "float32":
        assert "already computes in float32" in message and "recompute_fp32" not in message
