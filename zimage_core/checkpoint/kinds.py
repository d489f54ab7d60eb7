"""What kind of model a file's tensor names show, for every loader to name a file that is not its own.

Free of the model packages, so a loader can word its error without importing another model's code.
"""

from __future__ import annotations

from collections.abc import Iterable

# The Fun ControlNet Union's control embedder (every version has it).
CONTROLNET_EMBED_KEY = "control_all_x_embedder.2-1.weight"


def is_controlnet_checkpoint(keys: Iterable[str]) -> bool:
    """Whether tensor names are a Fun ControlNet's (control embedder or control layers)."""
    return any(k.endswith(CONTROLNET_EMBED_KEY) or ".control_layers." in k or k.startswith("control_layers.")
               for k in keys)
