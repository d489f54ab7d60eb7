"""The other layout users have: a diffusers download (Tongyi-MAI/Z-Image-Turbo style, sharded) in
ComfyUI's models/diffusers, picked in our loaders and run through the text-to-image workflow."""

from __future__ import annotations

from tests.comfy_harness import (
    LOADER_INPUTS,
    T2I,
    comfy_module,
    demo_prompt,
    nodes_of,
    run_ok,
    saved_images,
    session_dir,
)
from tests.text_fixtures import TINY as TEXT_TINY
from tests.text_fixtures import save_diffusers_layout, tiny_causal_lm
from tests.transformer_fixtures import make_diffusers_model
from tests.transformer_fixtures import write_diffusers_folder as write_transformer_folder
from tests.vae_fixtures import make_diffusers_vae
from tests.vae_fixtures import write_diffusers_folder as write_vae_folder


def test_diffusers_pipeline_folder_runs_through_our_loaders():
    root = session_dir("diffusers")
    pipeline = root / "Z-Image-Tiny"
    save_diffusers_layout(tiny_causal_lm(), pipeline)  # text_encoder/ (sharded) + tokenizer/
    write_transformer_folder(make_diffusers_model(cap_feat_dim=TEXT_TINY["hidden_size"]), pipeline / "transformer",
                             sharded=True)
    write_vae_folder(pipeline / "vae", make_diffusers_vae())
    comfy_module("folder_paths").add_model_folder_path("diffusers", str(root))

    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    names = {"ZImageModelLoader": "Z-Image-Tiny/transformer", "ZImageTextEncoderLoader": "Z-Image-Tiny/text_encoder",
             "ZImageVAELoader": "Z-Image-Tiny/vae"}
    prompt = demo_prompt(T2I, width=32, height=48, seed=3)
    for loader, name in names.items():
        input_name, _ = LOADER_INPUTS[loader]
        assert name in nodes[loader].INPUT_TYPES()["required"][input_name][0]
        prompt[nodes_of(prompt, loader)[0]]["inputs"][input_name] = name
    (image,) = saved_images(run_ok(prompt))
    assert image.shape == (48, 32, 3)
