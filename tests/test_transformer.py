"""ZImageTransformer against the references (diffusers 0.42.1, ComfyUI NextDiT) on tiny random weights."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.transformer_fixtures import (
    TINY,
    diffusers_velocity,
    import_comfy,
    make_diffusers_model,
    max_abs,
    ragged_inputs,
    rel_err,
    to_comfy,
)
from zimage_core.transformer import TransformerConfig, ZImageTransformer


def tiny_config(**overrides) -> TransformerConfig:
    cfg = {**TINY, **overrides}
    cfg.pop("axes_lens")
    return TransformerConfig(axes_dims=tuple(cfg.pop("axes_dims")), **cfg)


def ours_from(ref, operations=None) -> ZImageTransformer:
    model = ZImageTransformer(tiny_config(), operations=operations)
    sd = to_comfy(ref.state_dict(), prefix="", stray_norm_final=False)
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def ref():
    return make_diffusers_model(seed=0)


def test_ragged_batch_matches_diffusers(ref):
    model = ours_from(ref)
    x, sigma, caps = ragged_inputs()
    expected = diffusers_velocity(ref, x, sigma, caps)
    with torch.no_grad():
        got = model(x, sigma, caps)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, expected) <= 1e-5, rel_err(got, expected)  # measured ~3e-8
    assert max_abs(got, expected) <= 1e-5


@pytest.mark.parametrize("cap_lens, hw", [((32, 1), (16, 16)), ((33,), (2, 2)), ((64, 31, 3), (4, 30))],
                         ids=["no-pad", "single", "three-ragged"])
def test_other_layouts_match_diffusers(ref, cap_lens, hw):
    model = ours_from(ref)
    x, sigma, caps = ragged_inputs(seed=5, cap_lens=cap_lens, hw=hw, batch=len(cap_lens))
    with torch.no_grad():
        got = model(x, sigma, caps)
    assert rel_err(got, diffusers_velocity(ref, x, sigma, caps)) <= 1e-5


def test_even_batch_uses_no_mask_and_matches_ragged_per_sample(ref, monkeypatch):
    model = ours_from(ref)
    x, sigma, caps = ragged_inputs(cap_lens=(7, 45))
    masks = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        ragged = model(x, sigma, caps)
        assert any(m is not None for m in masks), "ragged batch must mask batch padding"
        masks.clear()
        # 7 and 20 tokens both pad to 32: equal lengths, so no mask at all (flash/cuDNN kernels).
        caps_even = [caps[0], caps[1][:20]]
        even = model(x, sigma, caps_even)
        assert masks and all(m is None for m in masks)
        single = model(x[1:], sigma[1:], [caps[1][:20]])
    assert rel_err(even[0], ragged[0]) <= 1e-6  # sample 0 sees the same inputs in both batches
    assert rel_err(even[1], single[0]) <= 1e-6
    assert rel_err(even[1], diffusers_velocity(ref, x[1:], sigma[1:], caps_even[1:])[0]) <= 1e-5


def test_full_config_has_official_parameter_count_and_key_names():
    model = ZImageTransformer(TransformerConfig.full(), device="meta")
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 6_154_908_736
    assert len(sd) == 453
    # Key families from the ComfyUI single-file format (ZIMAGE_FACTS §2), block indices collapsed.
    block = ["attention.qkv.weight", "attention.out.weight", "attention.q_norm.weight", "attention.k_norm.weight",
             "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
             "attention_norm1.weight", "attention_norm2.weight", "ffn_norm1.weight", "ffn_norm2.weight"]
    expected = {"x_embedder.weight", "x_embedder.bias", "x_pad_token", "cap_pad_token", "cap_embedder.0.weight",
                "cap_embedder.1.weight", "cap_embedder.1.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
                "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "final_layer.linear.weight",
                "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
                "final_layer.adaLN_modulation.1.bias"}
    for group in ("layers", "noise_refiner", "context_refiner"):
        expected |= {f"{group}.N.{b}" for b in block}
    for group in ("layers", "noise_refiner"):
        expected |= {f"{group}.N.adaLN_modulation.0.weight", f"{group}.N.adaLN_modulation.0.bias"}
    assert {re.sub(r"\.\d+\.", ".N.", k, count=1) if k.split(".")[0] in
            ("layers", "noise_refiner", "context_refiner") else k for k in sd} == expected
    assert {int(k.split(".")[1]) for k in sd if k.startswith("layers.")} == set(range(30))
    assert {int(k.split(".")[1]) for k in sd if k.startswith("context_refiner.")} == {0, 1}
    assert tuple(sd["layers.0.attention.qkv.weight"].shape) == (11520, 3840)
    assert tuple(sd["layers.0.adaLN_modulation.0.weight"].shape) == (15360, 256)
    assert tuple(sd["cap_embedder.1.weight"].shape) == (3840, 2560)
    assert tuple(sd["layers.29.feed_forward.w1.weight"].shape) == (10240, 3840)


def test_odd_latent_size_is_a_clear_error(ref):
    model = ours_from(ref)
    _, sigma, caps = ragged_inputs()
    with pytest.raises(ValueError, match=r"latent size 11x14.*multiples of 16 pixels"):
        model(torch.randn(2, 16, 11, 14), sigma, caps)


def test_wrong_caption_width_is_a_clear_error(ref):
    model = ours_from(ref)
    x, sigma, _ = ragged_inputs()
    with pytest.raises(ValueError, match=r"caption features 1 have shape \(5, 48\); expected \(tokens >= 1, 32\)"):
        model(x, sigma, [torch.randn(5, 32), torch.randn(5, 48)])


def test_operations_namespace_builds_every_linear(ref):
    built = []

    class CountingLinear(torch.nn.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    ops = SimpleNamespace(Linear=CountingLinear, LayerNorm=torch.nn.LayerNorm)
    model = ours_from(ref, operations=ops)
    # Every 2-D weight of the diffusers model is a Linear (to_q/to_k/to_v fuse into one qkv).
    n_linear = sum(1 for k, v in ref.state_dict().items() if v.ndim == 2 and "pad_token" not in k
                   and ".to_k." not in k and ".to_v." not in k)
    assert len(built) == n_linear
    assert all(isinstance(m, CountingLinear) for m in model.modules() if isinstance(m, torch.nn.Linear))
    x, sigma, caps = ragged_inputs()
    with torch.no_grad():
        assert rel_err(model(x, sigma, caps), diffusers_velocity(ref, x, sigma, caps)) <= 1e-5


def test_fp16_overflow_is_clamped(ref, monkeypatch):
    import zimage_core.accel.kernels as kernels

    model = ours_from(ref).half()
    with torch.no_grad():
        for block in [*model.noise_refiner, *model.layers]:
            block.feed_forward.w1.weight.mul_(10000)
            block.feed_forward.w3.weight.mul_(10000)
    x, sigma, caps = ragged_inputs()
    args = (x.half(), sigma, [c.half() for c in caps])
    with torch.no_grad():
        out = model(*args)
        monkeypatch.setattr(kernels, "clamp_fp16", lambda t: t)
        unclamped = model(*args)
    assert not torch.isfinite(unclamped).all(), "weights not large enough to overflow fp16"
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_matches_comfyui_nextdit():
    comfy_ops, NextDiT = import_comfy()
    # ComfyUI's timestep MLP is only the Z-Image shape (256 -> 1024 -> 256) for dim >= 1024, so this
    # test uses dim 1024 with the real head layout (8 heads of 128, axes 32/48/48), one layer each.
    cfg = TransformerConfig(dim=1024, n_layers=1, n_refiner_layers=1, n_heads=8, n_kv_heads=8, cap_feat_dim=64)
    ours = ZImageTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    # As comfy/model_detection.py configures Z-Image; multiple_of=1 keeps FFN width int(8/3 * dim).
    theirs = NextDiT(patch_size=2, in_channels=16, dim=1024, n_layers=1, n_refiner_layers=1, n_heads=8,
                     n_kv_heads=8, multiple_of=1, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True,
                     cap_feat_dim=64, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
                     z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
                     operations=comfy_ops.disable_weight_init).eval()
    sd = ours.state_dict()
    if hasattr(theirs, "norm_final"):  # ComfyUI 0.3.75 builds this unused norm (0.18.1 no longer does)
        sd["norm_final.weight"] = torch.ones(1024)
    theirs.load_state_dict(sd, strict=True)
    x = torch.randn(2, 16, 10, 14, generator=gen)
    sigma = torch.tensor([0.8, 0.4])
    context = torch.randn(2, 20, 64, generator=gen)  # ComfyUI batches equal-length conditioning
    with torch.no_grad():
        expected = theirs(x, sigma, context, num_tokens=20)  # ComfyUI returns the velocity already
        got = ours(x, sigma, list(context))
    # ComfyUI's q/k RMSNorm uses eps = finfo(fp32).eps instead of 1e-5 and builds RoPE angles in
    # float64; both move the output by ~3e-7 relative here, far inside 1e-5.
    assert rel_err(got, expected) <= 1e-5, rel_err(got, expected)
    assert max_abs(got, expected) <= 1e-4


def test_one_caption_is_shared_by_the_batch(ref):
    model = ours_from(ref)
    x, sigma, caps = ragged_inputs()
    with torch.no_grad():
        assert torch.equal(model(x, sigma, caps[:1]), model(x, sigma, [caps[0], caps[0]]))


def test_forward_refuses_bad_inputs_with_value_errors(ref):
    model = ours_from(ref)
    x, sigma, caps = ragged_inputs(batch=1, cap_lens=(7,))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"sigma must be real numbers, one noise level per sample \(1\).*got 3"):
            model(x, torch.tensor([0.5, 0.4, 0.3]), caps)
        with pytest.raises(ValueError, match="float latents"):
            model(x.to(torch.int32), sigma, caps)
        with pytest.raises(ValueError, match="caption features 0 must be a float tensor"):
            model(x, sigma, [caps[0].to(torch.int64)])


def test_config_values_are_bounded_before_anything_is_built():
    """Each value sizes modules: out-of-range ones fail at once. In a capped child process, because a
    regression here builds ten million layers."""
    from tests.limited_child import run_limited

    cases = '{"n_layers": 10**7, "dim": 2**40, "n_heads": 0, "patch_size": 1.5, "axes_dims": (2,) * 1000, ' \
            '"rope_theta": float("inf")}'
    result = run_limited(f"""
        cases = {cases}
        report(**{{k: attempt(lambda k=k, v=v: ZImageTransformer(TransformerConfig(**{{k: v}}), device="meta"))
                  for k, v in cases.items()}})
    """, imports="from zimage_core.transformer import TransformerConfig, ZImageTransformer")
    assert result["status"] == "ok", result
    for field in ("n_layers", "dim", "n_heads", "patch_size", "axes_dims", "rope_theta"):
        outcome = result[field]
        assert outcome["ok"] is False and outcome["type"] == "BoundsError", (field, outcome)
        assert field in outcome["message"] and outcome["seconds"] < 1.0, (field, outcome)
