"""The opt-in speed paths as ComfyUI users reach them: fp8 matmul weights and the compile nodes, which
return new models and leave the ones they are given (and every other branch) untouched."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.comfy_harness import comfy_module
from zimage_core.demo_weights import DEMO_FILES


def _nodes():
    return comfy_module("nodes").NODE_CLASS_MAPPINGS


def _load(weight_dtype: str):
    return _nodes()["ZImageModelLoader"]().load(DEMO_FILES["diffusion_models"], weight_dtype)[0]


def _cond():
    g = torch.Generator().manual_seed(3)
    return [[torch.randn(1, 9, 32, generator=g), {"pooled_output": None}]]


def _sample(model, steps: int = 2) -> torch.Tensor:
    nodes = _nodes()
    (latent,) = nodes["ZImageEmptyLatent"]().generate(48, 32, "custom", 1)
    return nodes["ZImageTurboSampler"]().sample(model, _cond(), latent, 7, steps, 3.0, 0.0)[0]["samples"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_fp8_fast_weights_use_fp8_matmuls_and_stay_close():
    reference = _sample(_load("default"))
    model = _load("fp8_e4m3fn_fast")
    # By name: ComfyUI imports the pack under its own package name, so the class object differs.
    fp8 = [m for m in model.model.diffusion_model.modules() if type(m).__name__ == "Fp8Linear"]
    assert fp8 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
    out = _sample(model)
    assert torch.isfinite(out).all()
    # e4m3 keeps 3 mantissa bits (≈6% per weight); two steps on random weights land within ~5%.
    assert _rel(out, reference) < 0.1


def test_fp8_attention_weight_dtype_switches_attention_to_fp8():
    reference = _sample(_load("default"))
    model = _load("fp8_e4m3fn_fast_attention")
    dit = model.model.diffusion_model
    blocks = [*dit.noise_refiner, *dit.context_refiner, *dit.layers]
    assert all(b.attention.fp8_attention for b in blocks)
    assert all(b.attention.qkv.weight.dtype == torch.float8_e4m3fn for b in blocks)
    out = _sample(model)
    assert torch.isfinite(out).all() and 0 < _rel(out, reference) < 0.15
    assert not any(b.attention.fp8_attention for b in _load("fp8_e4m3fn_fast").model.diffusion_model.layers)


def test_compile_node_returns_a_compiled_clone_and_leaves_the_other_branch_eager():
    model = _load("default")
    reference = _sample(model)
    (compiled,) = _nodes()["ZImageCompileModel"]().compile(model)
    assert compiled is not model and compiled.model is model.model  # a clone: weights shared, not copied
    assert _rel(_sample(compiled), reference) < 1e-5
    wrappers = compiled.wrappers.get("diffusion_model", {}).get("zimage_compile", [])
    (wrapper,) = wrappers
    # The compiled path ran (one compiled function per block) and did not fall back to eager.
    blocks = model.model.diffusion_model.layers
    assert wrapper.block_call.enabled and len(wrapper.block_call._fns) == len(blocks) + 1

    # The other branch: the given MODEL has no compile wrapper and its blocks were not touched.
    assert "zimage_compile" not in model.wrappers.get("diffusion_model", {})
    assert all("forward" not in b.__dict__ for b in blocks)
    calls = len(wrapper.block_call._fns)
    assert torch.equal(_sample(model), reference)
    assert len(wrapper.block_call._fns) == calls

    # The compiled artifacts were saved in ComfyUI's user directory (loaded again after a restart).
    import folder_paths
    cache = Path(folder_paths.get_user_directory()) / "__zimage" / "compile_cache"  # a folder no endpoint serves
    assert wrapper.block_call.cache is not None and wrapper.block_call.cache.folder == cache
    assert list(cache.glob("*.bin")), "no compile artifacts saved"


def test_compile_node_never_loads_a_planted_cache_file(tmp_path, monkeypatch, caplog):
    """A crafted cache file (a pickle that creates a marker; an entry keyed by an absolute path) planted on the
    file system where the cache looks (its folder, the one it used before, a ZIMAGE_COMPILE_CACHE folder, one
    inside <user>/default): compiling and sampling never runs it. (Over HTTP: test_comfy_hostile_inputs.py.)"""
    import logging

    nodes = _nodes()  # ComfyUI first: folder_paths is its module
    import folder_paths

    from tests.hostile_cache import crafted_cache
    from zimage_core.accel.compile_cache import environment_key

    user = Path(folder_paths.get_user_directory())
    pickled, written = tmp_path / "pickle-ran", tmp_path / "abs-key-written"
    data = crafted_cache(pickled, written)
    env_folder, served = tmp_path / "private_cache", user / "default" / "zimage_compile_cache"
    planted = []
    for folder in (user / "__zimage" / "compile_cache", user / "zimage_compile_cache", env_folder, served):
        folder.mkdir(parents=True, exist_ok=True)
        for digest in ("0" * 64, "planted"):
            planted.append(folder / f"{environment_key()}-{digest}.bin")
            planted[-1].write_bytes(data)
    model = _load("default")
    try:
        for env in (None, str(env_folder), str(served)):
            if env is None:
                monkeypatch.delenv("ZIMAGE_COMPILE_CACHE", raising=False)
            else:
                monkeypatch.setenv("ZIMAGE_COMPILE_CACHE", env)
            with caplog.at_level(logging.WARNING):
                (compiled,) = nodes["ZImageCompileModel"]().compile(model)
                _sample(compiled, steps=1)
            assert not pickled.exists() and not written.exists(), f"a planted cache file ran (cache: {env})"
        assert "compile cache is off" in caplog.text and str(served) in caplog.text
    finally:
        for path in planted:
            path.unlink(missing_ok=True)


def test_compile_vae_node_returns_a_fused_copy_and_keeps_the_image():
    nodes = _nodes()
    vae = nodes["ZImageVAELoader"]().load(DEMO_FILES["vae"])[0]
    raw = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(4))
    reference = nodes["ZImageVAEDecode"]().decode(vae, {"samples": raw})[0]
    (fused,) = nodes["ZImageCompileVAE"]().compile(vae)
    assert fused is not vae and fused.flux.is_channels_last
    assert not vae.flux.is_channels_last  # the given VAE is unchanged
    image = nodes["ZImageVAEDecode"]().decode(fused, {"samples": raw})[0]
    assert image.shape == reference.shape == (1, 32, 48, 3)
    assert float((image - reference).abs().max()) < 1e-4
    assert torch.equal(nodes["ZImageVAEDecode"]().decode(vae, {"samples": raw})[0], reference)


def test_loras_patch_fp8_fast_weights_through_their_row_scales():
    """LoraLoaderModelOnly on fp8_e4m3fn_fast weights: ComfyUI patches the real (dequantized) weight and
    stores it back with the layer's scales, so the LoRA does what it does on bf16/fp32 weights."""
    from tests.comfy_harness import DEMO_LORA

    lora = comfy_module("nodes").LoraLoaderModelOnly()
    # Strength 0.3: the demo LoRA then changes the result by ~30%, a strong but realistic LoRA.
    reference = _sample(lora.load_lora_model_only(_load("default"), DEMO_LORA, 0.3)[0])
    fp8 = _load("fp8_e4m3fn_fast")
    plain = _sample(fp8)
    patched = _sample(lora.load_lora_model_only(fp8, DEMO_LORA, 0.3)[0])
    assert _rel(patched, reference) < 0.1  # fp8 rounding, as without a LoRA
    assert _rel(plain, reference) > 3 * _rel(patched, reference)  # the LoRA was applied, not lost
    comfy_module("comfy.model_management").unload_all_models()
    assert torch.equal(_sample(fp8), plain)  # unpatching restores the stored fp8 weights


def test_cuda_graph_steps_through_comfyuis_sampler_are_freed_when_sampling_ends(monkeypatch):
    """With ZIMAGE_CUDA_GRAPHS=1 (opt-in) on a CUDA load device, the loader turns on whole-step CUDA graphs; through ComfyUI's own sampler loop the
    first step runs eagerly, the second is captured, the rest replay, the image is unchanged, and an
    OUTER_SAMPLE wrapper frees the graphs (their activation memory) when the run ends. The CPU has no CUDA
    graphs: an emulated capture (tests/test_graphs.py) stands in for the recording."""
    import sys

    from tests.test_graphs import EmulatedCapture

    reference = _sample(_load("default"), steps=4)
    model = _load("default")
    dit = model.model.diffusion_model
    assert dit.cuda_graphs is None  # CPU load device: off
    model_call = sys.modules[type(dit).__module__]
    graphs = sys.modules[model_call.__name__.rsplit(".", 2)[0] + ".zimage_core.accel.graphs"]
    model_call.use_step_graphs(model, torch.device("cuda"))
    assert dit.cuda_graphs is None  # off unless asked for
    monkeypatch.setattr(graphs, "ENABLED", True)
    model_call.use_step_graphs(model, torch.device("cuda"))
    dit.cuda_graphs.capturer = EmulatedCapture()
    cleared = []
    clear = dit.cuda_graphs.clear
    dit.cuda_graphs.clear = lambda: (cleared.append(len(dit.cuda_graphs)), clear())[1]
    out = _sample(model, steps=4)
    assert (dit.cuda_graphs.captures, dit.cuda_graphs.replays) == (1, 2)
    assert cleared[-1] == 1 and len(dit.cuda_graphs) == 0  # one graph held until the run ended
    assert torch.equal(out, reference)


def test_cuda_graphs_kept_between_runs_when_asked(monkeypatch):
    """ZIMAGE_CUDA_GRAPHS=keep: the second sampling run at the same shape replays from its first step."""
    import sys

    from tests.test_graphs import EmulatedCapture

    model = _load("default")
    dit = model.model.diffusion_model
    model_call = sys.modules[type(dit).__module__]
    graphs = sys.modules[model_call.__name__.rsplit(".", 2)[0] + ".zimage_core.accel.graphs"]
    monkeypatch.setattr(graphs, "ENABLED", True)
    model_call.use_step_graphs(model, torch.device("cuda"))
    dit.cuda_graphs.capturer = EmulatedCapture()
    monkeypatch.setattr(graphs, "KEEP", True)
    first = _sample(model, steps=4)
    assert (dit.cuda_graphs.captures, dit.cuda_graphs.replays, len(dit.cuda_graphs)) == (1, 2, 1)
    second = _sample(model, steps=4)
    assert (dit.cuda_graphs.captures, dit.cuda_graphs.replays) == (1, 6)
    assert torch.equal(first, second)
