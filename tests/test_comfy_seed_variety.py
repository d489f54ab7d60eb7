"""ZImageSeedVariety in the real ComfyUI on demo weights: strength 0 (or end 0) is bit-identical to no
node; the caption noise follows its definition (strength × each token's RMS, standard normal, from the
seed and the image index) on the early steps' positive rows only; the model given to it is unchanged."""

from __future__ import annotations

import pytest
import torch

from tests.comfy_harness import comfy_module
from zimage_core.demo_weights import DEMO_FILES

STEPS = 4


def _nodes():
    return comfy_module("nodes").NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def parts():
    nodes = _nodes()
    model = nodes["ZImageModelLoader"]().load(DEMO_FILES["diffusion_models"], "default")[0]
    clip = nodes["ZImageTextEncoderLoader"]().load(DEMO_FILES["text_encoders"])[0]
    (cond,) = nodes["ZImageTextEncode"]().encode(clip, "a lighthouse on a cliff at dusk")
    (neg,) = nodes["ZImageTextEncode"]().encode(clip, "blurry")
    return model, cond, neg


def _latent(batch: int = 1) -> dict:
    return _nodes()["ZImageEmptyLatent"]().generate(32, 32, "custom", batch)[0]


def _sample(model, cond, seed: int, batch: int = 1, guidance: float = 0.0, negative=None) -> torch.Tensor:
    sampler = _nodes()["ZImageTurboSampler"]()
    return sampler.sample(model, cond, _latent(batch), seed, STEPS, 3.0, guidance, negative)[0]["samples"]


def _variety(model, strength: float, end: float):
    return _nodes()["ZImageSeedVariety"]().patch(model, strength, end)[0]


def test_strength_zero_or_end_zero_is_bit_identical_to_no_node(parts):
    model, cond, _ = parts
    plain = _sample(model, cond, seed=11)
    for strength, end in [(0.0, 0.25), (0.0, 1.0), (1.5, 0.0)]:
        assert torch.equal(_sample(_variety(model, strength, end), cond, seed=11), plain), (strength, end)
    varied = _sample(_variety(model, 1.0, 0.5), cond, seed=11)
    assert not torch.equal(varied, plain), "strength > 0 must change the result"
    assert torch.equal(_sample(_variety(model, 1.0, 0.5), cond, seed=11), varied), "the same seed repeats"


def _recorded_contexts(model, cond, *, strength, end, seed, batch=1, guidance=0.0, negative=None):
    """The caption features the diffusion model received per call, seen by a wrapper inside the node's."""
    patcher_extension = comfy_module("comfy.patcher_extension")
    seen = []

    def record(executor, x, timesteps, context, *args, **kwargs):
        options = kwargs["transformer_options"]
        seen.append((float(options["sigmas"][0]), list(options["cond_or_uncond"]), context.clone()))
        return executor(x, timesteps, context, *args, **kwargs)

    patched = _variety(model, strength, end)
    patched.add_wrapper_with_key(patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_record", record)
    _sample(patched, cond, seed, batch, guidance, negative)
    return seen


def test_noise_only_on_early_steps_positive_rows_and_sized_by_token_rms(parts):
    model, cond, neg = parts
    strength, end = 0.8, 0.5  # steps 0 and 1 of 4
    # With CFG the positive and negative prompts (different lengths) go to the model in separate calls.
    plain = {(round(s, 6), tuple(k)): c for s, k, c in _recorded_contexts(
        model, cond, strength=0.0, end=end, seed=5, batch=2, guidance=1.0, negative=neg)}
    calls = _recorded_contexts(model, cond, strength=strength, end=end, seed=5, batch=2, guidance=1.0, negative=neg)
    sigmas = sorted({round(s, 6) for s, _, _ in calls}, reverse=True)
    assert len(sigmas) == STEPS and {k for _, kinds, _ in calls for k in kinds} == {0, 1}
    for sigma, kinds, context in calls:
        step = sigmas.index(round(sigma, 6))
        base = plain[(round(sigma, 6), tuple(kinds))]
        per = context.shape[0] // len(kinds)
        for chunk, kind in enumerate(kinds):
            rows = slice(chunk * per, (chunk + 1) * per)
            if kind == 1 or step >= 2:  # negative rows, and every row after the cutoff: untouched
                assert torch.equal(context[rows], base[rows]), (step, kind)
                continue
            delta = (context[rows] - base[rows]).float()
            rms = base[rows].float().pow(2).mean(-1, keepdim=True).sqrt()
            z = delta / rms
            assert abs(z.std().item() - strength) < 0.05 * strength, z.std().item()
            assert abs(z.mean().item()) < 0.05
            assert not torch.allclose(z[0], z[1]), "images of a batch get their own caption noise"


def test_seed_changes_the_caption_noise_and_the_model_is_not_mutated(parts):
    model, cond, _ = parts
    wrappers_before = {k: dict(v) for k, v in model.wrappers.items()}
    a = _recorded_contexts(model, cond, strength=1.0, end=0.25, seed=1)[0][2]
    b = _recorded_contexts(model, cond, strength=1.0, end=0.25, seed=2)[0][2]
    assert not torch.equal(a, b)
    assert {k: dict(v) for k, v in model.wrappers.items()} == wrappers_before


def test_bad_values_are_refused_with_a_message(parts):
    model, _, _ = parts
    with pytest.raises(ValueError, match=r"end is 1.5; set a number between 0.0 and 1.0"):
        _variety(model, 0.5, 1.5)
    with pytest.raises(ValueError, match=r"strength is nan; set a number"):
        _variety(model, float("nan"), 0.25)
