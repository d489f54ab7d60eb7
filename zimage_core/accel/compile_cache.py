"""A persistent store for torch.compile's compiled artifacts, so a restarted process skips most compiling.

torch keeps its compiled code (Inductor's FX-graph cache, Triton binaries, autotuning results) in a
temporary folder by default, which a new machine, container or cleaned /tmp loses. `CompileCache(folder)`
saves the artifacts of everything compiled in this process (`torch.compiler.save_cache_artifacts`,
"mega-cache") into `folder` after new shapes were compiled, and loads every saved file once per process
before the first compile (`torch.compiler.load_cache_artifacts`): a later compile of the same graphs then
hits the cache instead of generating and building kernels again. Files are keyed by the torch, Triton and
GPU versions (artifacts of other versions are useless to this process) and named by their content's hash,
so two processes never write the same file; the oldest beyond `keep` are removed.

The files hold torch's own serialized compile output (the same kind of data as its default
/tmp/torchinductor_<user> cache); keep the folder as private as ComfyUI's user folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_LOADED: set[str] = set()  # files loaded by this process (load once)
_LOCK = threading.Lock()


def environment_key() -> str:
    """torch / Triton / GPU identity the artifacts are valid for (a file-name-safe string)."""
    parts = [f"torch{torch.__version__}"]
    try:
        import triton
        parts.append(f"triton{triton.__version__}")
    except Exception:  # noqa: BLE001 - CPU-only torch builds have no Triton
        parts.append("notriton")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        parts.append(f"cuda{torch.version.cuda}-sm{major}{minor}")
    else:
        parts.append("cpu")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


def _torch_has_new_artifacts() -> bool:
    try:
        from torch.compiler._cache import CacheArtifactManager
        return bool(CacheArtifactManager.need_serialize())
    except Exception:  # noqa: BLE001 - a private API: without it, only noted signatures trigger a save
        return False


class CompileCache:
    """Save/load torch.compile artifacts in `folder` (created on first save)."""

    def __init__(self, folder: str | os.PathLike, keep: int = 8) -> None:
        self.folder = Path(folder)
        self.keep = max(1, int(keep))
        self.key = environment_key()
        self._seen: set[tuple] = set()
        self._dirty = False

    def files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.glob(f"{self.key}-*.bin") if p.is_file()]
        return sorted(found, key=lambda p: p.stat().st_mtime)

    def load(self) -> int:
        """Load every saved file of this environment not yet loaded by this process. Returns the count;
        a damaged or foreign file is skipped with a warning (compilation then simply runs)."""
        count = 0
        with _LOCK:
            for path in self.files():
                name = str(path.resolve())
                if name in _LOADED:
                    continue
                _LOADED.add(name)
                try:
                    info = torch.compiler.load_cache_artifacts(path.read_bytes())
                except Exception as exc:  # noqa: BLE001 - a bad cache file must never stop a run
                    log.warning("Z-Image compile cache: could not load %s (%s); it will be recompiled.", path, exc)
                    continue
                if info is not None:
                    count += 1
        if count:
            log.info("Z-Image compile cache: loaded %d file(s) from %s", count, self.folder)
        return count

    def note(self, key: tuple) -> None:
        """Record a call signature (e.g. shapes); a new one means something new may have been compiled."""
        if key not in self._seen:
            self._seen.add(key)
            self._dirty = True

    def save_if_new(self) -> Path | None:
        """Save this process's artifacts if new signatures were noted, or torch compiled something
        (e.g. the VAE's fused kernels), since the last save."""
        if not self._dirty and not _torch_has_new_artifacts():
            return None
        self._dirty = False
        return self.save()

    def save(self) -> Path | None:
        """Write this process's compile artifacts (None when there is nothing to save or saving fails)."""
        try:
            result = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # noqa: BLE001
            log.warning("Z-Image compile cache: torch could not serialize its artifacts (%s).", exc)
            return None
        if result is None:
            return None
        data = result[0]
        path = self.folder / f"{self.key}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
            with _LOCK:
                _LOADED.add(str(path.resolve()))
            for old in self.files()[:-self.keep]:
                old.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("Z-Image compile cache: could not write %s (%s).", path, exc)
            return None
        log.info("Z-Image compile cache: saved %s (%.1f MB)", path.name, len(data) / 1e6)
        return path
