"""A persistent store for torch.compile's compiled artifacts, so a restarted process skips most compiling.

torch keeps its compiled code (Inductor's FX-graph cache, Triton binaries, autotuning results) in a
temporary folder by default, which a new machine, container or cleaned /tmp loses. `CompileCache(folder)`
saves the artifacts of everything compiled in this process (`torch.compiler.save_cache_artifacts`,
"mega-cache") into `folder` after new shapes were compiled, and loads every saved file once per process
before the first compile (`torch.compiler.load_cache_artifacts`): a later compile of the same graphs then
hits the cache instead of generating and building kernels again. Files are keyed by the torch, Triton and
GPU versions (artifacts of other versions are useless to this process); the oldest beyond `keep` are removed.

Loading a file runs code: torch unpickles its compiled graphs, and an entry's key is a path torch writes
to. So a file is only loaded when it carries this installation's signature: its name holds an HMAC-SHA256
of its bytes under a secret key (`key_file`, created with mode 0600 in a private place, never in the cache
folder), so a file that anyone else wrote - a web client, another user of a shared folder, a file copied
from elsewhere - is ignored without being read by torch. Signed files are checked once more before torch
sees them: every entry's key must be a plain relative name (no absolute path, no "..").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
import zlib
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_LOADED: set[str] = set()  # files loaded by this process (load once)
_LOCK = threading.Lock()
KEY_BYTES = 32
_DIGEST = re.compile(r"[0-9a-f]{64}")


class UnsafeCacheError(RuntimeError):
    """The cache cannot be used safely (its key file is readable by others, or not this user's)."""


def default_key_file() -> Path:
    """Where the signing key lives when the caller names none: this user's private config folder."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "zimage" / "compile_cache.key"


def _read_or_create_key(path: Path) -> bytes:
    """The secret (KEY_BYTES random bytes) in `path`, created with mode 0600 (folder 0700) if missing.

    Refused (UnsafeCacheError) if the file is a link, not a regular file, not owned by this user, or
    readable or writable by anyone else: a key others can read signs nothing.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
    try:
        fd = os.open(path, os.O_RDONLY | nofollow)
    except OSError as exc:
        raise UnsafeCacheError(f"cannot open the compile cache key {path} ({exc}); delete it") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        owner_ok = not hasattr(os, "getuid") or st.st_uid == os.getuid()
        if not stat.S_ISREG(st.st_mode) or not owner_ok or st.st_mode & 0o077:
            raise UnsafeCacheError(
                f"the compile cache key {path} is not a private file of this user (mode "
                f"{stat.S_IMODE(st.st_mode):o}); delete it (a new one is made) and keep its folder private")
        key = f.read(KEY_BYTES + 1)
    if len(key) != KEY_BYTES:
        raise UnsafeCacheError(f"the compile cache key {path} is damaged; delete it (a new one is made)")
    return key


def artifact_keys(data: bytes) -> list[tuple[str, str]]:
    """(type, key) of every entry of a torch mega-cache blob, read without unpickling anything.

    The layout is torch's AppendingByteSerializer: a CRC32, a version, then per artifact type its name,
    a count and (key, content) pairs; strings are base64, everything length-prefixed. Raises ValueError
    for anything else (a newer torch's format, a damaged file).
    """
    if len(data) < 12 or zlib.crc32(data[4:]).to_bytes(4, "big") != data[:4]:
        raise ValueError("checksum mismatch")
    pos = 4

    def read_bytes() -> bytes:
        nonlocal pos
        if pos + 8 > len(data):
            raise ValueError("truncated")
        size = int.from_bytes(data[pos:pos + 8], "big")
        pos += 8
        if size > len(data) - pos:
            raise ValueError("truncated")
        pos += size
        return data[pos - size:pos]

    def read_str() -> str:
        try:
            return base64.b64decode(read_bytes(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ValueError("bad string") from exc

    if int.from_bytes(data[pos:pos + 8], "big") != 1:
        raise ValueError("unknown format version")
    pos += 8
    out = []
    while pos < len(data):
        kind = read_str()
        if pos + 8 > len(data):
            raise ValueError("truncated")
        count = int.from_bytes(data[pos:pos + 8], "big")
        pos += 8
        if count > len(data):
            raise ValueError("bad count")
        for _ in range(count):
            out.append((kind, read_str()))
            read_bytes()  # the content: never interpreted here
    return out


def unsafe_key(key: str) -> bool:
    """True for an entry key that would make torch write outside its cache folder."""
    if not key or "\0" in key or "\\" in key or key.startswith(("/", "~")) or os.path.isabs(key):
        return True
    return ".." in key.split("/")


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
    """Save/load signed torch.compile artifacts in `folder` (created, mode 0700, on first save).

    `key_file`: the signing key (default: `default_key_file()`); keep it out of `folder` and of anything
    others can write or read. If the key cannot be used safely the cache is off (`enabled` False, a
    warning says why and what to do) and compiling simply runs.
    """

    def __init__(self, folder: str | os.PathLike, keep: int = 8, key_file: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder)
        self.keep = max(1, int(keep))
        self.key = environment_key()
        self.key_file = Path(key_file) if key_file is not None else default_key_file()
        self._secret: bytes | None = None
        self.enabled = True
        self._seen: set[tuple] = set()
        self._dirty = False

    def _signing_key(self) -> bytes | None:
        if self._secret is None and self.enabled:
            try:
                if self.folder.resolve() in (self.key_file.resolve().parent, *self.key_file.resolve().parents):
                    raise UnsafeCacheError(f"the key file {self.key_file} lies inside the cache folder {self.folder}")
                self._secret = _read_or_create_key(self.key_file)
            except (UnsafeCacheError, OSError) as exc:
                self.enabled = False
                log.warning("Z-Image compile cache is off: %s. Compiling still works, only nothing is kept.", exc)
        return self._secret

    def _digest(self, data: bytes) -> str:
        secret = self._signing_key()
        assert secret is not None
        return hmac.new(secret, self.key.encode() + b"\0" + data, hashlib.sha256).hexdigest()

    def files(self) -> list[Path]:
        """This environment's files, oldest first (signed or not: `load` checks the signature)."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.glob(f"{self.key}-*.bin") if p.is_file() and not p.is_symlink()]
        return sorted(found, key=lambda p: p.stat().st_mtime)

    def _check(self, path: Path, data: bytes) -> str | None:
        """Why `path` must not be loaded (None: it is this installation's own, with plain keys)."""
        digest = path.name[len(self.key) + 1:-len(".bin")]
        if not (_DIGEST.fullmatch(digest) and hmac.compare_digest(digest, self._digest(data))):
            return "not signed by this installation's key (written by someone else, or damaged)"
        try:
            keys = artifact_keys(data)
        except ValueError as exc:
            return f"not a torch cache file this check can read ({exc})"
        bad = next((k for _, k in keys if unsafe_key(k)), None)
        if bad is not None:
            return f"an entry's key leaves the cache folder ({bad[:80]!r})"
        return None

    def load(self) -> int:
        """Load every signed file of this environment not yet loaded by this process. Returns the count;
        a foreign, damaged or unsafe file is skipped unread with a warning (compilation then simply runs)."""
        count = 0
        if self._signing_key() is None:
            return 0
        with _LOCK:
            for path in self.files():
                name = str(path.resolve())
                if name in _LOADED:
                    continue
                _LOADED.add(name)
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    log.warning("Z-Image compile cache: could not read %s (%s); it will be recompiled.", path, exc)
                    continue
                problem = self._check(path, data)
                if problem is not None:
                    log.warning("Z-Image compile cache: ignored %s: %s. It was not loaded (loading runs code); "
                                "delete it.", path, problem)
                    continue
                try:
                    info = torch.compiler.load_cache_artifacts(data)
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
        """Write this process's compile artifacts, signed (None when there is nothing to save, the cache is
        off or saving fails)."""
        if self._signing_key() is None:
            return None
        try:
            result = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # noqa: BLE001
            log.warning("Z-Image compile cache: torch could not serialize its artifacts (%s).", exc)
            return None
        if result is None:
            return None
        data = result[0]
        path = self.folder / f"{self.key}-{self._digest(data)}.bin"
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not path.exists():
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
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
