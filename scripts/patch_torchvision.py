"""Make PyPI's (CUDA-built) torchvision importable on the CPU build of torch.

Its `_meta_registrations.py` registers fake kernels for `torchvision::nms`/`qnms` with bare
`torch.library.register_fake` decorators; on CPU torch those ops do not exist and the import
fails. This wraps the two decorators so a missing op is skipped. Test-environment only: it is
applied by scripts/setup.sh to the venv it creates, never to a user's install.
"""

from __future__ import annotations

import importlib.util
import pathlib

GUARD = '''
def _zimage_guarded_register_fake(name):  # patched by ComfyUI-ZImage scripts/setup.sh
    def decorate(fn):
        try:
            return torch.library.register_fake(name)(fn)
        except RuntimeError:  # the op is missing on CPU torch
            return fn
    return decorate
'''


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise SystemExit("torchvision is not installed")
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if "_zimage_guarded_register_fake" in text:
        return
    text = text.replace("@torch.library.register_fake(", "@_zimage_guarded_register_fake(")
    anchor = "\n\n@functools.lru_cache"
    text = text.replace(anchor, "\n" + GUARD + anchor, 1)
    path.write_text(text)


if __name__ == "__main__":
    main()
