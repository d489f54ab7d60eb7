"""Opt-in speed/memory paths of the transformer keep its function: weight streaming, fp8 weights,
and the eager fallback when torch.compile fails. (Their GPU speed is measured by bench/bench.py.)"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.transformer_fixtures import (
    TINY,
    diffusers_velocity,
    make_diffusers_model,
    ragged_inputs,
    rel_err,
    to_comfy,
    write_comfy_file,
)
from zimage_core.accel import FP8, Fp8Linear, WeightPrefetcher
from zimage_core.transformer import TransformerConfig, ZImageTransformer, load_transformer


def _tiny(ref, n_layers: int | None = None) -> ZImageTransformer:
    cfg = {**TINY}
    cfg.pop("axes_lens")
    if n_layers is not None:
        cfg["n_layers"] = n_layers
    model = ZImageTransformer(TransformerConfig(axes_dims=tuple(cfg.pop("axes_dims")), **cfg))
    model.load_state_dict(to_comfy(ref.state_dict(), prefix="", stray_norm_final=False), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def ref():
    return make_diffusers_model(seed=0)


@pytest.fixture(scope="module")
def ref5():
    return make_diffusers_model(seed=3, n_layers=5)


@pytest.mark.parametrize("resident", [0, 1, 2, 5])
def test_streamed_blocks_give_identical_output_across_calls(ref5, resident):
    x, sigma, caps = ragged_inputs()
    with torch.no_grad():
        expected = _tiny(ref5, 5)(x, sigma, caps)
        model = _tiny(ref5, 5)
        streamer = model.stream_blocks("cpu", resident=resident)
        first, second = model(x, sigma, caps), model(x, sigma, caps)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    streamer.remove("cpu")
    with torch.no_grad():
        assert torch.equal(model(x, sigma, caps), expected)


def _prefetch_blocks(shapes: list[tuple[int, int]], seed: int = 0) -> list[torch.nn.Linear]:
    torch.manual_seed(seed)
    return [torch.nn.Linear(i, o) for i, o in shapes]


def test_prefetched_blocks_of_different_shapes_compute_as_without_prefetch():
    blocks = _prefetch_blocks([(4, 6), (6, 3), (3, 8), (8, 4)])
    x = torch.randn(2, 4)

    def run() -> torch.Tensor:
        h = x
        for b in blocks:
            h = b(h)
        return h

    with torch.no_grad():
        want = run()
        hosts = [[p.data_ptr() for p in b.parameters()] for b in blocks]
        pf = WeightPrefetcher(blocks, "cpu", select=lambda t: True, ahead=2, wrap=True)
        assert len(pf) == 4 and pf.n_slots == 3
        for _ in range(3):  # repeated passes: the last blocks start the first ones' copies
            assert torch.equal(run(), want)
        # Between calls the parameters are the host tensors again (nothing moved or copied for good).
        assert all(p.data_ptr() == h for b, hs in zip(blocks, hosts, strict=True) for p, h in zip(b.parameters(), hs, strict=True))
        # A change of the host weights between calls (e.g. a LoRA patch) is what the next call uses.
        blocks[3].weight.data.mul_(2)
        assert not torch.equal(run(), want)
        pf.remove()


def test_prefetch_recopies_a_block_whose_slot_went_to_an_out_of_order_call():
    blocks = _prefetch_blocks([(5, 5)] * 4, seed=1)
    x = torch.randn(3, 5)
    with torch.no_grad():
        want = [b(x) for b in blocks]
        pf = WeightPrefetcher(blocks, "cpu", select=lambda t: True, ahead=1)
        # 0 copies itself and 1; 2 comes first and takes a slot; 0 again evicts the waiting copy of 1.
        for j in [0, 2, 0, 1, 3, 1, 0]:
            assert torch.equal(blocks[j](x), want[j]), j
        pf.remove()


def test_prefetch_leaves_host_weights_in_place_after_a_block_raises():
    blocks = _prefetch_blocks([(4, 4), (4, 4)])
    hosts = [b.weight.data_ptr() for b in blocks]
    pf = WeightPrefetcher(blocks, "cpu", select=lambda t: True)
    with torch.no_grad(), pytest.raises(RuntimeError):
        blocks[0](torch.randn(2, 5))  # wrong width: the layer raises after the pre-hook swapped weights
    pf.release()
    assert all(b.weight.data_ptr() == h for b, h in zip(blocks, hosts, strict=True))
    pf.remove()


def test_fp8_linear_quantizes_per_row_and_stays_close():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        lin.weight[3] *= 100  # one large row: per-row scales keep the other rows precise
    q = Fp8Linear(lin.weight)
    assert q.weight.dtype == FP8 and q.weight_scale.shape == (1, 48)
    x = torch.randn(5, 7, 64)
    with torch.no_grad():
        got, want = q(x), lin(x)
    assert got.shape == want.shape
    assert rel_err(got, want) < 0.05
    others = [i for i in range(48) if i != 3]
    assert rel_err(got[..., others], want[..., others]) < 0.05


def test_quantize_fp8_replaces_block_matmuls_only(ref):
    model = _tiny(ref)
    n = model.quantize_fp8()
    blocks = [*model.noise_refiner, *model.context_refiner, *model.layers]
    assert n == 5 * len(blocks)
    for b in blocks:
        assert isinstance(b.attention.qkv, Fp8Linear) and isinstance(b.feed_forward.w2, Fp8Linear)
    # Embedders, modulation and the final layer keep their precision.
    assert model.x_embedder.weight.dtype == torch.float32
    assert model.layers[0].adaLN_modulation[0].weight.dtype == torch.float32
    x, sigma, caps = ragged_inputs()
    with torch.no_grad():
        err = rel_err(model(x, sigma, caps), diffusers_velocity(ref, x, sigma, caps))
    assert err < 0.05, err  # fp8 e4m3 keeps 3 mantissa bits


def test_load_transformer_quantize_option(ref, tmp_path):
    path = write_comfy_file(ref, tmp_path / "z.safetensors")
    model = load_transformer(path, quantize="fp8")
    assert isinstance(model.layers[0].attention.qkv, Fp8Linear)
    with pytest.raises(ValueError, match="quantize must be None or 'fp8'"):
        load_transformer(path, quantize="int4")


def test_compile_failure_falls_back_to_eager(ref, caplog):
    model = _tiny(ref)
    x, sigma, caps = ragged_inputs()
    with torch.no_grad():
        expected = model(x, sigma, caps)

    class FakeCompilerError(RuntimeError):
        pass
    FakeCompilerError.__module__ = "torch._inductor.exc"

    def broken(*args, **kwargs):
        raise FakeCompilerError("no C compiler")

    blocks = [*model.layers, *model.noise_refiner]
    for b in blocks:
        b.forward = broken  # what compile_blocks installs, but failing like a missing toolchain
    model._compiled_blocks = blocks
    with caplog.at_level(logging.WARNING), torch.no_grad():
        got = model(x, sigma, caps)
    assert torch.equal(got, expected)
    assert "running the Z-Image transformer eagerly" in caplog.text
    assert not model._compiled_blocks and all("forward" not in b.__dict__ for b in blocks)


def test_failing_compiled_block_call_is_disabled_and_the_call_finishes_eagerly(ref, caplog):
    """The per-call compiled runner (what ZImageCompileModel hands the transformer) falls back the same way,
    and stays off for later calls; the model itself is never changed."""
    from zimage_core.accel import CompiledBlockCall

    model = _tiny(ref)
    x, sigma, caps = ragged_inputs()
    with torch.no_grad():
        expected = model(x, sigma, caps)

    class FakeCompilerError(RuntimeError):
        pass
    FakeCompilerError.__module__ = "torch._inductor.exc"

    class Broken(CompiledBlockCall):
        def __call__(self, *args):
            if self.enabled:
                raise FakeCompilerError("no C compiler")
            return super().__call__(*args)

    runner = Broken()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        got = model(x, sigma, caps, block_call=runner)
    assert torch.equal(got, expected)
    assert "running the Z-Image transformer eagerly" in caplog.text
    assert not runner.enabled and not model._compiled_blocks


def test_model_errors_are_not_swallowed_by_the_compile_fallback(ref):
    model = _tiny(ref)
    model._compiled_blocks = list(model.layers)
    _, sigma, caps = ragged_inputs()
    with pytest.raises(ValueError, match="latent size"):
        model(torch.randn(2, 16, 11, 14), sigma, caps)


def test_channels_last_group_norm_silu_matches_torch():
    from zimage_core.vae.model import _group_norm_silu

    torch.manual_seed(0)
    x = torch.randn(2, 64, 6, 10).to(memory_format=torch.channels_last)
    w, b = torch.randn(64), torch.randn(64)
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, w, b, 1e-6))
    got = _group_norm_silu(x, w, b, 32, 1e-6)
    assert got.is_contiguous(memory_format=torch.channels_last)  # no NCHW round trip
    assert rel_err(got, want) < 1e-6
    nchw = x.contiguous()
    assert rel_err(_group_norm_silu(nchw, w, b, 32, 1e-6), want) < 1e-6


def test_streamed_text_encoder_matches_resident(tmp_path):
    from tests.text_fixtures import save_comfy_file, tiny_causal_lm
    from zimage_core.text_encoder import load_text_encoder

    path = save_comfy_file(tiny_causal_lm(), tmp_path / "qwen.safetensors")
    enc = load_text_encoder(path)
    prompts = ["a cat", "a much longer prompt about a red bicycle"]
    want = enc.encode(prompts)
    enc.stream_weights("cpu")
    assert enc.device.type == "cpu" and enc._streamer is not None
    for _ in range(2):  # slots are released after each encode and come back
        got = enc.encode(prompts)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    enc.stop_streaming()
    assert all(torch.equal(g, w) for g, w in zip(enc.encode(prompts), want, strict=True))
