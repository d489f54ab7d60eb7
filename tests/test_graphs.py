"""Whole-step CUDA graphs (zimage_core.accel.graphs): when a step is captured, replayed, captured again or left
eager. The CUDA capture itself needs a GPU (bench/bench.py's `graphs` stage checks replay against eager there);
here an emulated capture (the recorded forward re-runs on the graph's static buffers at each replay) exercises
everything around it on the CPU, and outputs are checked against diffusers 0.42.1."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from tests.transformer_fixtures import TINY, diffusers_velocity, make_diffusers_model, rel_err, to_comfy
from zimage_core.accel import graphs
from zimage_core.transformer import TransformerConfig, ZImageTransformer, use_backend


class EmulatedCapture:
    """Stands in for CudaCapture on the CPU: a replay runs the recorded forward again on the static inputs and
    writes into the static output, as a CUDA graph replay does."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.attempts = 0

    def supports(self, x: torch.Tensor) -> bool:
        return True

    def capture(self, thunk, device):
        self.attempts += 1
        out = thunk()
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        static = thunk()

        def replay():
            static.copy_(thunk())
        return out, replay, static


def _tiny(ref) -> ZImageTransformer:
    cfg = {**TINY}
    cfg.pop("axes_lens")
    model = ZImageTransformer(TransformerConfig(axes_dims=tuple(cfg.pop("axes_dims")), **cfg))
    model.load_state_dict(to_comfy(ref.state_dict(), prefix="", stray_norm_final=False), strict=True)
    return model.eval()


def _inputs(seed: int, hw=(8, 12), cap_len: int = 9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, *hw, generator=g)
    sigma = torch.rand(1, generator=g) * 0.8 + 0.1
    return x, sigma, [torch.randn(cap_len, 32, generator=g)]


@pytest.fixture(scope="module")
def ref():
    return make_diffusers_model(seed=0)


def _graphed(ref, capture=None, max_graphs: int = 2) -> ZImageTransformer:
    model = _tiny(ref)
    model.use_cuda_graphs(max_graphs=max_graphs)
    model.cuda_graphs.capturer = capture or EmulatedCapture()
    return model


@torch.no_grad()
def test_replayed_steps_follow_each_calls_inputs(ref):
    model = _graphed(ref)
    for seed in range(5):  # eager, capture, then three replays with new latents, sigmas and captions
        x, sigma, caps = _inputs(seed)
        out = model(x, sigma, caps)
        assert rel_err(out, diffusers_velocity(ref, x, sigma, caps)) < 1e-5, seed
    assert (model.cuda_graphs.captures, model.cuda_graphs.replays) == (1, 3)


@torch.no_grad()
def test_each_shape_gets_its_own_graph_up_to_the_limit(ref):
    model = _graphed(ref, max_graphs=1)
    for hw, cap_len in [((8, 12), 9), ((8, 12), 9), ((6, 6), 9), ((6, 6), 9), ((6, 6), 40), ((6, 6), 40)]:
        x, sigma, caps = _inputs(len(hw) + cap_len, hw, cap_len)
        assert rel_err(model(x, sigma, caps), diffusers_velocity(ref, x, sigma, caps)) < 1e-5
    assert model.cuda_graphs.captures == 3 and len(model.cuda_graphs) == 1  # the oldest graphs were dropped


@torch.no_grad()
def test_a_replaced_weight_drops_the_graphs_and_an_in_place_update_does_not(ref, caplog):
    """A graph reads weights by address: ComfyUI's LoRA patching or a reload replaces Parameters (new
    addresses), so the graphs must be captured again; an in-place update is read by the graph as it is."""
    model = _graphed(ref)
    x, sigma, caps = _inputs(0)
    for _ in range(3):
        model(x, sigma, caps)
    assert model.cuda_graphs.captures == 1
    w = model.layers[0].attention.out.weight
    w.mul_(1.5)
    model(x, sigma, caps)
    assert model.cuda_graphs.captures == 1 and len(model.cuda_graphs) == 1
    with caplog.at_level(logging.INFO, logger="zimage_core.accel.graphs"):
        model.layers[0].attention.out.weight = torch.nn.Parameter(w.detach() * 2, requires_grad=False)
        changed = copy.deepcopy(ref)
        changed.layers[0].attention.to_out[0].weight.mul_(3)  # 1.5 in place, then 2 by replacement
        for _ in range(3):  # eager, capture, replay
            assert rel_err(model(x, sigma, caps), diffusers_velocity(changed, x, sigma, caps)) < 1e-5
    assert model.cuda_graphs.captures == 2 and len(model.cuda_graphs) == 1
    assert "weights or kernel settings changed" in caplog.text


@torch.no_grad()
def test_steps_that_cannot_be_captured_run_eagerly(ref):
    """Hooks (ControlNet, ComfyUI patches), an installed attention backend (ComfyUI's attention override) and
    weights ComfyUI casts per call never go through a graph."""
    model = _graphed(ref)
    x, sigma, caps = _inputs(0)

    class Hooks:
        def after_noise_refiner(self, *args):
            return None

        def after_layer(self, i, seq, *args):
            return seq * 1.0 if i == 0 else None

    def backend(q, k, v, mask):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
        return out.transpose(1, 2).flatten(2)

    want = diffusers_velocity(ref, x, sigma, caps)
    for _ in range(3):
        assert rel_err(model(x, sigma, caps, hooks=Hooks()), want) < 1e-5
        with use_backend(backend):
            assert rel_err(model(x, sigma, caps), want) < 1e-5
    assert model.cuda_graphs.captures == 0 and model.cuda_graphs.capturer.attempts == 0
    with use_backend(backend):
        assert "attention backend" in graphs.why_not(model, x)
    model.layers[0].feed_forward.w1.comfy_cast_weights = True
    assert "cast or patched per call" in graphs.why_not(model, x)
    model.layers[0].feed_forward.w1.comfy_cast_weights = False
    model.x_pad_token = torch.nn.Parameter(torch.zeros(1, 64, device="meta"), requires_grad=False)
    assert "offloaded" in graphs.why_not(model, x)


@torch.no_grad()
def test_a_failed_capture_leaves_that_shape_eager_with_one_warning(ref, caplog):
    capture = EmulatedCapture(fail=True)
    model = _graphed(ref, capture)
    with caplog.at_level(logging.WARNING, logger="zimage_core.accel.graphs"):
        for seed in range(4):
            x, sigma, caps = _inputs(seed)
            assert rel_err(model(x, sigma, caps), diffusers_velocity(ref, x, sigma, caps)) < 1e-5
    assert capture.attempts == 1 and model.cuda_graphs.captures == 0
    assert caplog.text.count("capture failed") == 1


def test_graphs_stay_off_on_the_cpu_without_an_emulation(ref):
    model = _tiny(ref)
    model.use_cuda_graphs()
    x, sigma, caps = _inputs(0)
    with torch.no_grad():
        for _ in range(3):
            model(x, sigma, caps)
    assert model.cuda_graphs.captures == 0 and len(model.cuda_graphs) == 0
