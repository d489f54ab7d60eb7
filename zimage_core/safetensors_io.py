"""Reading safetensors checkpoints lazily: single files and diffusers folders (sharded or not).

Only safetensors is ever read (never pickle). Headers are parsed up front so a truncated or
non-safetensors file fails with a `CheckpointError` naming the file, before any tensor is read;
tensors are then memory-mapped one at a time so loading never holds a second full copy in RAM.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


def read_header(path: Path, what: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors header; returns (tensor infos, metadata)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(path, what, f"a {size}-byte file, too short to be safetensors",
                                      "The download is incomplete: download the file again.")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n + 8 > size:
                raise CheckpointError(path, f"{what} in .safetensors format",
                                      "no valid safetensors header (not a safetensors file, or truncated)",
                                      "Use the .safetensors file; .ckpt/.pt/.bin (pickle) files are not loaded.")
            raw = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"{what} in .safetensors format", f"an unreadable file ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(path, f"{what} in .safetensors format", "a malformed header")
    metadata = raw.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    data_size = size - 8 - n
    for key, entry in raw.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            shape = tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"{what} in .safetensors format",
                                  f"a malformed entry for tensor {key!r}") from None
        if end > data_size:
            raise CheckpointError(path, what,
                                  f"a truncated file ({size} bytes; tensor {key!r} ends past the end)",
                                  "The download is incomplete: download the file again.")
        infos[key] = TensorInfo(shape, dtype, Path(path))
    return infos, metadata


class Checkpoint(Mapping[str, torch.Tensor]):
    """A read-only, lazy key → tensor view over one or more safetensors files.

    `shapes` gives every tensor's shape and dtype without reading data; indexing reads (mmaps)
    one tensor. `path` is what the user passed, for error messages.
    """

    def __init__(self, path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str],
                 config: dict | None = None) -> None:
        self.path = path
        self.infos = infos
        self.metadata = metadata
        self.config = config
        self._handles: dict[Path, object] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self.infos[key]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
        return handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.infos[key].dtype

    def close(self) -> None:
        self._handles.clear()


def open_checkpoint(path: str | os.PathLike, what: str) -> Checkpoint:
    """Open a `.safetensors` file or a diffusers component folder (e.g. `transformer/`).

    A folder may hold one `*.safetensors` file or shards listed in a `*.safetensors.index.json`;
    its `config.json`, if present, is returned as `Checkpoint.config`. `what` describes the
    expected model ("a Z-Image transformer") for error messages.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, what, "nothing at that path", "Check the file name and folder.")
    config = None
    if path.is_dir():
        files = _folder_files(path, what)
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                config = json.loads(cfg.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(cfg, "a JSON model config", f"an unreadable file ({e})") from None
    else:
        files = [path]
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for file in files:
        file_infos, file_meta = read_header(file, what)
        infos.update(file_infos)
        metadata.update(file_meta)
    if not infos:
        raise CheckpointError(path, what, "a checkpoint with no tensors")
    return Checkpoint(path, infos, metadata, config)


def _folder_files(folder: Path, what: str) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(indexes[0], "a safetensors shard index", f"an unreadable index ({e})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(folder, f"{what} with all shards listed in {indexes[0].name}",
                                  f"missing shard(s) {', '.join(missing)}",
                                  "Download the missing files into the same folder.")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "an empty folder"
        raise CheckpointError(folder, f"{what}: a folder with .safetensors weights", found)
    return files
