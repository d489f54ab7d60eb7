"""Our CLIP follows ComfyUI's precision policy for Qwen3: weights stored as the file has them, computed in
float32 through per-layer casts (what native CLIPLoader does: `SDClipModel.forward` runs the model with
`dtype=torch.float32` and `comfy.ops.manual_cast` layers).

A tiny random Qwen3 in bf16, in the layout users have (qwen_3_4b.safetensors: HF Qwen3ForCausalLM names), is
loaded with ZImageTextEncoderLoader in the real ComfyUI and encoded with CLIPTextEncode. Reference:
transformers' Qwen3Model in float32 on the same bf16-rounded weights (hidden_states[-2], Z-Image's features).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.comfy_harness import comfy, comfy_module
from tests.text_fixtures import PROMPTS, TINY, rel_err, save_comfy_file, tiny_causal_lm, tiny_config

FILE = "zimage_test_qwen3_bf16.safetensors"
# ComfyUI's Qwen3 config fixes head_dim at Qwen3-4B's 128 (a class attribute, not a setting): the tiny model
# here has that head size.
SHAPES = {**TINY, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128}
TOL = 1e-5


@pytest.fixture(scope="module")
def bf16_file():
    path = comfy().models_dir / "text_encoders" / FILE
    save_comfy_file(tiny_causal_lm(seed=3, **SHAPES), path, torch.bfloat16)
    yield path
    path.unlink(missing_ok=True)


def _reference(path, ids: list[int]) -> torch.Tensor:
    """transformers' Qwen3 in float32 on the file's (bf16-rounded) weights: hidden_states[-2]."""
    from transformers import Qwen3Model

    model = Qwen3Model(tiny_config(**SHAPES)).eval()
    sd = {k[len("model."):]: v.float() for k, v in load_file(str(path)).items() if k.startswith("model.")}
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-2][0]


def _native_clip(path):
    """ComfyUI's own Z-Image text encoder (what CLIPLoader type lumina2 builds for qwen_3_4b) on the tiny
    file: CLIPLoader detects Qwen3-4B by its 2560 width, so the target is built as comfy.sd does for it, with
    the tiny shapes given through the model options ComfyUI reads for the "qwen3_4b" model."""
    sd_module, utils = comfy_module("comfy.sd"), comfy_module("comfy.utils")
    z_image = comfy_module("comfy.text_encoders.z_image")
    llama_detect = comfy_module("comfy.text_encoders.hunyuan_video").llama_detect
    sd = utils.load_torch_file(str(path))
    target = comfy_module("comfy.supported_models_base").ClipTarget(z_image.ZImageTokenizer,
                                                                   z_image.te(**llama_detect(sd)))
    shapes = {k: SHAPES[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "rope_theta", "rms_norm_eps")}
    clip = sd_module.CLIP(target, parameters=utils.calculate_parameters(sd),
                          model_options={"qwen3_4b_model_config": shapes})
    clip.load_sd(sd)
    return clip


def test_bf16_file_is_stored_in_bf16_and_computed_like_native(bf16_file):
    nodes = comfy_module("nodes")
    clip = nodes.NODE_CLASS_MAPPINGS["ZImageTextEncoderLoader"]().load(FILE)[0]
    native = _native_clip(bf16_file)
    params = list(clip.cond_stage_model.parameters())
    # Stored as the file is: every weight bf16, so the model takes what the file takes (not an fp32 copy).
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert clip.patcher.model_size() == sum(p.numel() * 2 for p in params)
    errs, native_errs = [], []
    for text in (PROMPTS["english"], PROMPTS["chinese_poster"], ""):
        (cond,) = nodes.CLIPTextEncode().encode(clip, text)[0]
        (native_cond,) = nodes.CLIPTextEncode().encode(native, text)[0]
        ids = [t[0] for t in clip.tokenize(text)["qwen3_4b"][0]]
        ref = _reference(bf16_file, ids)
        assert cond[0][0].shape == ref.shape == native_cond[0][0].shape
        assert torch.isfinite(cond[0]).all()
        errs.append(rel_err(cond[0][0], ref))
        native_errs.append(rel_err(native_cond[0][0], ref))
    print(f"bf16 Qwen3 file, features vs transformers fp32 on the same weights: ours {max(errs):.2e}, "
          f"native CLIPLoader {max(native_errs):.2e}")
    assert max(native_errs) <= TOL  # the reference is what ComfyUI computes
    assert max(errs) <= TOL
    # Encoding leaves the weights as they were (a cast per layer, not a conversion of the model).
    assert {p.dtype for p in clip.cond_stage_model.parameters()} == {torch.bfloat16}
