"""Reading safetensors checkpoints: single files and diffusers folders (sharded or not).

Only safetensors is ever read (never pickle). Headers are parsed and checked up front (every tensor's
byte range must match its dtype and shape and lie inside the file), so a truncated, lying or
non-safetensors file fails with a `CheckpointError` naming the file before any tensor is read.

Model files are untrusted input and may change on disk while a server runs:
- Only regular files are opened (a FIFO, device or socket would hang or stream forever).
- A shard index may only name files inside its own folder.
- Tensors are read one at a time. `Checkpoint.view` may return memory that is still the file's
  (mmap); loaders pass every tensor they keep through `Checkpoint.owned`, so a loaded model never
  depends on the file again (rewriting or truncating it cannot crash the process or change the model).
- `mmap=False` reads with plain file reads instead of a memory map (ComfyUI's --disable-mmap).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap as _mmap
import os
import stat
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from ..errors import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_MAX_JSON = 64 * 1024 * 1024  # config.json, shard indexes, tokenizer files: a few MB at most in practice
_MAX_DIMS = 8
_MAX_DIM = 1 << 40
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in _DTYPES.values()}
_FOLDER_FILES = (".safetensors", ".json", ".txt")  # what loaders read from a diffusers folder


# -- plain files -------------------------------------------------------------------------------------

def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def check_regular(path: str | os.PathLike, what: str) -> None:
    """Raise CheckpointError unless `path` is a regular file (symlinks followed). Opens nothing."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(path, what, "nothing at that path", "Check the file name and folder.") from None
    except OSError as e:
        raise CheckpointError(path, what, f"a file that cannot be accessed ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(path, f"{what} (a regular file)", _kind(mode),
                              "Point the loader at the model file itself.")


def open_regular(path: str | os.PathLike, what: str) -> int:
    """A read-only file descriptor for `path`, which must be a regular file.

    Checked with stat before opening (a FIFO is never opened) and with fstat after (the path could be
    swapped in between); O_NONBLOCK keeps even that open from waiting for a FIFO writer.
    """
    check_regular(path, what)
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise CheckpointError(path, what, f"a file that cannot be opened ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(path, f"{what} (a regular file)", _kind(mode))
    return fd


def _read_exact(fd: int, offset: int, out: memoryview, path: object, what: str) -> None:
    """Fill `out` from `fd` at `offset`; a short file (changed since its header was read) is an error."""
    done = 0
    os.lseek(fd, offset, os.SEEK_SET)
    while done < len(out):
        n = os.readv(fd, [out[done:]]) if hasattr(os, "readv") else _read_into(fd, out[done:])
        if n == 0:
            raise CheckpointError(path, what, "a file that is shorter than its header says (it changed or was "
                                  "truncated while loading)", "Wait until the file is completely written, "
                                  "then load it again.")
        done += n


def _read_into(fd: int, out: memoryview) -> int:  # Windows has no readv
    data = os.read(fd, min(len(out), 1 << 30))
    out[: len(data)] = data
    return len(data)


def read_small_file(path: str | os.PathLike, what: str, limit: int = _MAX_JSON) -> bytes:
    """The bytes of a small regular file (config, index, tokenizer), refusing anything over `limit`."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointError(path, what, f"a {size}-byte file (more than {limit} bytes)",
                                  "This is not the small text file expected here.")
        buf = bytearray(size)
        _read_exact(fd, 0, memoryview(buf), path, what)
        return bytes(buf)
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike, what: str, limit: int = _MAX_JSON) -> object:
    """Parse a small JSON file; every failure (bad UTF-8, syntax, absurd nesting) is a CheckpointError."""
    data = read_small_file(path, what, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(path, what, f"a file that is not valid JSON ({str(e)[:200]})") from None


# -- headers -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    begin: int = 0  # absolute byte offsets in `file`
    end: int = 0


def read_header(path: Path, what: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors header; returns (tensor infos, metadata)."""
    fmt = f"{what} in .safetensors format"
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        head = os.read(fd, 8)
        if len(head) < 8:
            raise CheckpointError(path, what, f"a {size}-byte file, too short to be safetensors",
                                  "The download is incomplete: download the file again.")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or n + 8 > size:
            raise CheckpointError(path, fmt, "no valid safetensors header (not a safetensors file, or truncated)",
                                  "Use the .safetensors file; .ckpt/.pt/.bin (pickle) files are not loaded.")
        buf = bytearray(n)
        _read_exact(fd, 8, memoryview(buf), path, what)
    except OSError as e:
        raise CheckpointError(path, fmt, f"an unreadable file ({e})") from None
    finally:
        os.close(fd)
    try:
        raw = json.loads(buf.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(path, fmt, f"an unreadable header ({str(e)[:200]})",
                              "Use the .safetensors file; .ckpt/.pt/.bin (pickle) files are not loaded.") from None
    if not isinstance(raw, dict):
        raise CheckpointError(path, fmt, "a malformed header")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, fmt, "malformed __metadata__ (it must map names to strings)")
    infos: dict[str, TensorInfo] = {}
    start = 8 + n
    data_size = size - start
    for key, entry in raw.items():
        infos[key] = _tensor_info(path, what, key, entry, start, data_size, size)
    return infos, metadata


def _tensor_info(path: Path, what: str, key: str, entry: object, start: int, data_size: int,
                 size: int) -> TensorInfo:
    fmt = f"{what} in .safetensors format"
    bad = CheckpointError(path, fmt, f"a malformed entry for tensor {key!r}")
    if not isinstance(entry, dict):
        raise bad
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype_name, str) or not isinstance(shape, list) or not isinstance(offsets, list):
        raise bad
    if dtype_name not in _DTYPES:
        raise CheckpointError(path, fmt, f"tensor {key!r} of unsupported type {dtype_name[:20]!r}")
    ints = [*shape, *offsets]
    if (len(offsets) != 2 or len(shape) > _MAX_DIMS
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints)
            or any(d > _MAX_DIM for d in shape)):
        raise bad
    dtype = _DTYPES[dtype_name]
    begin, end = offsets
    if end > data_size:
        raise CheckpointError(path, what, f"a truncated file ({size} bytes; tensor {key!r} ends past the end)",
                              "The download is incomplete: download the file again.")
    if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
        raise CheckpointError(path, fmt, f"tensor {key!r}: shape {shape} {dtype_name} needs "
                              f"{math.prod(shape) * _ITEMSIZE[dtype]} bytes, its entry spans {end - begin}")
    return TensorInfo(tuple(shape), dtype, Path(path), start + begin, start + end)


# -- checkpoints -------------------------------------------------------------------------------------

class _OpenFile:
    def __init__(self, path: Path, what: str) -> None:
        self.fd = open_regular(path, what)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Checkpoint(Mapping[str, torch.Tensor]):
    """A read-only, lazy key → tensor view over one or more safetensors files.

    `infos` gives every tensor's shape and dtype without reading data. Indexing returns a tensor in
    memory of its own (a copy). Loaders use `view` (no copy; may be the file's memory when `mmap`)
    and pass what they keep through `owned`. `path` is what the user passed, for error messages.
    Use as a context manager, or call `close()`.
    """

    def __init__(self, path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str],
                 config: dict | None = None, *, mmap: bool = True) -> None:
        self.path = path
        self.infos = infos
        self.metadata = metadata
        self.config = config
        self.mmap = bool(mmap)
        self._files: dict[Path, _OpenFile] = {}
        # One mapping per tensor view, alive exactly as long as a tensor views it: the process never
        # keeps the whole file mapped (its pages would count as resident memory on top of the copies).
        self._maps: list[tuple[weakref.ref, int, int]] = []

    FILE_KIND = "a safetensors checkpoint"  # for messages
    # Block-quantised tensors (GGUF's Q8_0, Q4_K, ...): key -> type name. None in safetensors files.
    block_quant: dict[str, str] = {}

    def dequantized(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """A block-quantised tensor in float32 on `device`; None for every other tensor (see GGUFCheckpoint)."""
        return None

    def _open(self, file: Path) -> _OpenFile:
        handle = self._files.get(file)
        if handle is None:
            handle = self._files[file] = _OpenFile(file, self.FILE_KIND)
        return handle

    def _map(self, handle: _OpenFile, info: TensorInfo) -> torch.Tensor:
        start = info.begin - info.begin % _mmap.ALLOCATIONGRANULARITY
        try:
            if hasattr(_mmap, "MAP_PRIVATE"):
                # Read-only, and populated in one call: the view is only ever copied from, and
                # prefaulting the range is several times faster than faulting it page by page.
                mapping = _mmap.mmap(handle.fd, info.end - start, offset=start, prot=_mmap.PROT_READ,
                                     flags=_mmap.MAP_PRIVATE | getattr(_mmap, "MAP_POPULATE", 0))
            else:  # Windows
                mapping = _mmap.mmap(handle.fd, info.end - start, offset=start, access=_mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(info.file, self.FILE_KIND, f"a file that cannot be memory-mapped "
                                  f"({e})", "Load it with mmap disabled.") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": intended, nothing writes it
            whole = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive while viewed
        self._maps = [m for m in self._maps if m[0]() is not None]
        self._maps.append((weakref.ref(mapping), whole.data_ptr(), whole.data_ptr() + whole.numel()))
        return whole[info.begin - start:]

    def view(self, key: str) -> torch.Tensor:
        """The tensor `key` without an extra copy. With mmap this is the file's memory, read-only
        (never write into it) and valid only while the file is unchanged: pass anything you keep
        through `owned`."""
        info = self.infos[key]
        if info.end == info.begin:
            return torch.empty(info.shape, dtype=info.dtype)
        raw = self._bytes(info)
        if self.mmap and info.begin % _ITEMSIZE[info.dtype]:
            raw = raw.clone()  # misaligned for a typed view (legal but unusual): copy it
        return raw.view(info.dtype).reshape(info.shape)

    def _bytes(self, info: TensorInfo) -> torch.Tensor:
        """A tensor's bytes (uint8, 1-D): a view of the file's memory with mmap, else read into memory."""
        nbytes = info.end - info.begin
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        handle = self._open(info.file)
        # A file truncated since its header was read: an error here instead of a SIGBUS in the copy.
        if os.fstat(handle.fd).st_size < info.end:
            raise CheckpointError(info.file, self.FILE_KIND, "a file that is shorter than its "
                                  "header says (it changed or was truncated while loading)",
                                  "Wait until the file is completely written, then load it again.")
        if self.mmap:
            return self._map(handle, info)[:nbytes]
        raw = torch.empty(nbytes, dtype=torch.uint8)
        _read_exact(handle.fd, info.begin, memoryview(raw.numpy()), info.file, self.FILE_KIND)
        return raw

    def owned(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` itself, or a copy if its memory is part of a memory-mapped file of this checkpoint."""
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return tensor
        ptr = tensor.untyped_storage().data_ptr()
        if any(ref() is not None and lo <= ptr < hi for ref, lo, hi in self._maps):
            return tensor.clone()
        return tensor

    def load(self, key: str, *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `key` converted to `device`/`dtype`, in memory of its own, with at most one copy."""
        return self.owned(self.view(key).to(device=device, dtype=dtype))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.owned(self.view(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.infos[key].dtype

    def close(self) -> None:
        """Close the files. Tensors from `view` stay valid (a mapping lives as long as they do)."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        self._maps.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - half-built object or interpreter shutdown
            pass


def open_checkpoint(path: str | os.PathLike, what: str, *, mmap: bool = True) -> Checkpoint:
    """Open a `.safetensors` file, a `.gguf` file (a `GGUFCheckpoint`) or a diffusers component folder
    (e.g. `transformer/`).

    A folder may hold one `*.safetensors` file or shards listed in a `*.safetensors.index.json`;
    its `config.json`, if present, is returned as `Checkpoint.config` (it must be a JSON object).
    `what` describes the expected model ("a Z-Image transformer") for error messages. `mmap=False`
    reads tensors with plain file reads (no memory map of the file).
    """
    path = Path(path)
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        raise CheckpointError(path, what, "nothing at that path", "Check the file name and folder.") from None
    except OSError as e:
        raise CheckpointError(path, what, f"a path that cannot be accessed ({e.strerror})") from None
    config = None
    if is_dir:
        files = _folder_files(path, what)
        cfg = path / "config.json"
        if os.path.lexists(cfg):
            config = read_json(cfg, "a JSON model config")
            if not isinstance(config, dict):
                raise CheckpointError(cfg, "a JSON model config (an object of settings)",
                                      f"a JSON {type(config).__name__}")
    else:
        from .gguf import is_gguf, open_gguf  # a GGUF file: by its name, or its magic whatever its name

        if is_gguf(path):
            return open_gguf(path, what, mmap=mmap)
        files = [path]
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for file in files:
        file_infos, file_meta = read_header(file, what)
        infos.update(file_infos)
        metadata.update(file_meta)
    if not infos:
        raise CheckpointError(path, what, "a checkpoint with no tensors")
    return Checkpoint(path, infos, metadata, config, mmap=mmap)


def _inside(name: object) -> bool:
    """Whether a shard name from an index stays inside the index's folder (checked on the text alone)."""
    if not isinstance(name, str) or not name or "\0" in name:
        return False
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.anchor or pure.is_absolute() or ".." in pure.parts:
            return False
    return True


def _folder_files(folder: Path, what: str) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = read_json(indexes[0], "a safetensors shard index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(indexes[0], "a safetensors shard index with a weight_map object",
                                  "no weight_map")
        names = list(dict.fromkeys(weight_map.values()))
        # Refused on the name alone, before any file system access, so the error cannot tell
        # whether such a path exists.
        outside = [n for n in names if not _inside(n)]
        if outside:
            raise CheckpointError(indexes[0], "a shard index that lists files inside its own folder",
                                  f"a weight_map entry {str(outside[0])[:200]!r} that points elsewhere",
                                  "Restore the index file from the original download.")
        files = [folder / name for name in names]
        missing = [f.name for f in files if not os.path.lexists(f)]
        if missing:
            raise CheckpointError(folder, f"{what} with all shards listed in {indexes[0].name}",
                                  f"missing shard(s) {', '.join(missing[:8])}",
                                  "Download the missing files into the same folder.")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "an empty folder"
        raise CheckpointError(folder, f"{what}: a folder with .safetensors weights", found)
    return files


# -- change detection --------------------------------------------------------------------------------

def model_fingerprint(path: str | os.PathLike) -> str:
    """A cheap stamp that changes when a model path's files change (for ComfyUI's IS_CHANGED).

    A file: its size and mtime (ns). A folder (diffusers layout): the names, sizes and mtimes of its
    `*.safetensors`, `*.json` and `*.txt` files and those of its direct subfolders (a pipeline root's
    `transformer/`, `text_encoder/`, `tokenizer/`, `vae/`). Reads no file contents; symlinks are
    followed. Returns "missing" when nothing is at `path`.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    if not stat.S_ISDIR(st.st_mode):
        return f"{st.st_size}-{st.st_mtime_ns}"
    digest = hashlib.sha256()
    for rel in _listing(path, depth=2):
        try:
            s = os.stat(path / rel)
            digest.update(f"{rel}\0{s.st_size}\0{s.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            digest.update(f"{rel}\0unreadable\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def _listing(folder: Path, depth: int) -> list[str]:
    out: list[str] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return out
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            continue
        if is_dir:
            if depth > 1:
                out += [f"{entry.name}/{rel}" for rel in _listing(folder / entry.name, depth - 1)]
        elif entry.name.endswith(_FOLDER_FILES):
            out.append(entry.name)
    return out
