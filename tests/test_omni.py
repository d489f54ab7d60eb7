"""Z-Image Omni reference images on our transformer against diffusers 0.42.1's Omni `ZImageTransformer2DModel`.

The same random Omni-shaped weights (SigLIP embedder and refiner, SigLIP pad token) run in both; our model is
called with the diffusers layout (`OmniInputs(style="diffusers")`). ComfyUI's own Omni path is the reference of
tests/test_comfy_omni.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.transformer_fixtures import TINY, make_diffusers_model, max_abs, rel_err, to_comfy
from zimage_core.transformer import OmniInputs, TransformerConfig, ZImageTransformer

SIGLIP = 24  # tiny SigLIP feature width (the real one is 1152)


def ours_like(ref) -> ZImageTransformer:
    cfg = {**TINY}
    cfg.pop("axes_lens")
    model = ZImageTransformer(TransformerConfig(axes_dims=tuple(cfg.pop("axes_dims")), siglip_feat_dim=SIGLIP, **cfg))
    model.load_state_dict(to_comfy(ref.state_dict(), prefix="", stray_norm_final=False), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def ref():
    model = make_diffusers_model(seed=3, siglip_feat_dim=SIGLIP)
    # Sharper attention than N(0, 0.05) weights give (near-uniform scores), so that token positions, the
    # thing the Omni layouts differ in, move the output well past the tolerance.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm_q." in name or ".norm_k." in name:
                p.mul_(40)
    return model


def omni_inputs(n_refs: int, with_siglip: bool, seed: int = 7):
    """A CFG batch of 2 (prompt and negative prompt of different lengths) with n_refs reference latents of
    different sizes, their caption segments as diffusers' Omni pipeline splits the template, and SigLIP
    feature grids of other sizes than the latents."""
    gen = torch.Generator().manual_seed(seed)
    dim = TINY["cap_feat_dim"]
    sizes = [(8, 6), (4, 10), (6, 6)][:n_refs]
    refs = [torch.randn(1, 16, h, w, generator=gen) for h, w in sizes]
    sig = [torch.randn(1, 3 + j, 5 - j, SIGLIP, generator=gen) for j in range(n_refs)] if with_siglip else []
    ref_caps = [torch.randn(n, dim, generator=gen) for n in (6, 3, 3)[:n_refs]]  # "<|im_start|>user\n<|vision_start|>" ...
    trailing = torch.randn(5, dim, generator=gen)  # "<|vision_end|><|im_end|>"
    prompts = [torch.randn(n, dim, generator=gen) for n in (29, 40)]  # positive, negative
    x = torch.randn(2, 16, 10, 8, generator=gen)
    sigma = torch.tensor([0.6, 0.6])
    return x, sigma, prompts, refs, ref_caps, trailing, sig


def diffusers_omni(ref, x, sigma, prompts, refs, ref_caps, trailing, sig):
    b = x.shape[0]
    xs = [[r[0].unsqueeze(1) for r in refs] + [x[i].unsqueeze(1)] for i in range(b)]
    caps = [[*ref_caps, prompts[i], trailing] for i in range(b)]
    sigs = [[s[0] for s in sig] + [None] for _ in range(b)] if sig else [None] * b
    noise = [[0] * len(refs) + [1] for _ in range(b)]
    with torch.no_grad():
        out = ref(xs, 1.0 - sigma, caps, siglip_feats=sigs, image_noise_mask=noise, return_dict=False)[0]
    return -torch.stack([o.squeeze(1) for o in out])


@pytest.mark.parametrize("n_refs, with_siglip", [(1, True), (2, True), (1, False), (2, False)],
                         ids=["1-ref-siglip", "2-refs-siglip", "1-ref", "2-refs"])
def test_omni_cfg_batch_matches_diffusers(ref, n_refs, with_siglip):
    model = ours_like(ref)
    x, sigma, prompts, refs, ref_caps, trailing, sig = omni_inputs(n_refs, with_siglip)
    expected = diffusers_omni(ref, x, sigma, prompts, refs, ref_caps, trailing, sig)
    with torch.no_grad():
        got = model(x, sigma, prompts, omni=OmniInputs(refs, [*ref_caps, trailing], sig, style="diffusers"))
    assert got.shape == x.shape
    assert rel_err(got, expected) <= 1e-5, rel_err(got, expected)
    assert max_abs(got, expected) <= 1e-5
    # The references change the output (a model that ignored them would not pass the check above by chance,
    # but make sure the comparison is not vacuous).
    with torch.no_grad():
        plain = model(x, sigma, prompts)
    assert rel_err(plain, expected) > 1e-2


def test_the_comfyui_layout_differs_from_diffusers_where_the_readme_says(ref):
    """The two references position SigLIP tokens and captions differently: the default (ComfyUI's) layout
    gives another output than diffusers' on the same inputs."""
    model = ours_like(ref)
    x, sigma, prompts, refs, ref_caps, trailing, sig = omni_inputs(2, True)
    with torch.no_grad():
        comfy = model(x, sigma, prompts, omni=OmniInputs(refs, [*ref_caps, trailing], sig))
        diff = model(x, sigma, prompts, omni=OmniInputs(refs, [*ref_caps, trailing], sig, style="diffusers"))
    assert rel_err(comfy, diff) > 1e-4


def test_bad_omni_inputs_are_clear_errors(ref):
    model = ours_like(ref)
    x, sigma, prompts, refs, ref_caps, trailing, sig = omni_inputs(1, True)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"reference latent 1 \(B, 16, H, W\), got \(1, 4, 8, 6\)"):
            model(x, sigma, prompts, omni=OmniInputs([torch.randn(1, 4, 8, 6)], [*ref_caps, trailing]))
        with pytest.raises(ValueError, match=r"SigLIP features of reference 1 have shape \(1, 3, 5, 7\)"):
            model(x, sigma, prompts, omni=OmniInputs(refs, [*ref_caps, trailing], [torch.randn(1, 3, 5, 7)]))
        with pytest.raises(ValueError, match=r"reference caption 1 has shape"):
            model(x, sigma, prompts, omni=OmniInputs(refs, [torch.randn(4, 5), trailing]))
        with pytest.raises(ValueError, match=r"reference latent 1 has a batch of 3, the latents 2"):
            model(x, sigma, prompts, omni=OmniInputs([refs[0].expand(3, -1, -1, -1)], [*ref_caps, trailing]))
        with pytest.raises(ValueError, match="style must be one of"):
            OmniInputs(refs, style="other")


def test_a_reference_of_odd_latent_size_is_padded_by_repeating_its_edge(ref):
    """TextEncodeZImageOmni resizes references to multiples of 8 pixels, so a latent side can be odd: the
    last row is repeated up to the patch size (the reference then equals its padded copy)."""
    model = ours_like(ref)
    x, sigma, prompts, refs, ref_caps, trailing, sig = omni_inputs(1, True)
    odd = refs[0][:, :, :7, :]
    padded = torch.cat([odd, odd[:, :, -1:]], 2)
    with torch.no_grad():
        got = model(x, sigma, prompts, omni=OmniInputs([odd], [*ref_caps, trailing], sig))
        expected = model(x, sigma, prompts, omni=OmniInputs([padded], [*ref_caps, trailing], sig))
    assert torch.equal(got, expected)
