"""Entry script of a parallel worker process (run by `workers.WorkerGroup` through runpy.run_path).

It imports this package as the top-level `zimage_core` from the folder that holds it, so a worker needs
neither ComfyUI nor the custom-node package name the main process loaded the pack under.
"""

import sys

_args = globals()["ZIMAGE_WORKER"]
if globals()["ZIMAGE_ROOT"] not in sys.path:
    sys.path.insert(0, globals()["ZIMAGE_ROOT"])

from zimage_core.parallel.workers import serve  # noqa: E402

serve(**_args)
