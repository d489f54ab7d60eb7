"""Run hostile-input code in a child Python with a memory cap and a timeout.

A regression in a loader (a skeleton of ten million layers, a read from a FIFO, a SIGBUS from a
truncated mapping) then fails one test instead of taking the test machine down. The child caps its
address space at its size after imports plus `extra_bytes`, so the cap works the same with CPU and
CUDA builds of torch (whose imports map very different amounts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PRELUDE = """
import json, os, re, resource, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
{imports}
_size = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (_size + {extra}, _size + {extra}))

def attempt(fn):
    \"\"\"Run fn(); report its error type and message (or its value) and how long it took.\"\"\"
    start = time.perf_counter()
    try:
        value = fn()
        return {{"ok": True, "value": value if isinstance(value, (bool, int, float, str)) else repr(value)[:300],
                "seconds": time.perf_counter() - start}}
    except BaseException as e:  # MemoryError and SystemExit too: everything is a result here
        return {{"ok": False, "type": type(e).__name__, "message": str(e)[:3000],
                "seconds": time.perf_counter() - start}}

def report(**values):
    print("RESULT " + json.dumps(values), flush=True)
"""


def run_limited(code: str, *, imports: str = "", timeout: float = 120.0,
                extra_bytes: int = 3 << 30) -> dict:
    """Run `code` (which calls `report(...)` once at the end) in a capped child; return what it reported.

    Returns {"status": "ok", **reported}, or {"status": "timeout"} / {"status": "died", "returncode": rc,
    "stderr": tail} when the child hung or was killed (e.g. -7 = SIGBUS).
    """
    script = _PRELUDE.format(root=str(ROOT), imports=textwrap.dedent(imports), extra=int(extra_bytes))
    script += textwrap.dedent(code)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONHASHSEED": "0"}
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"status": "died", "returncode": proc.returncode, "stderr": proc.stderr[-3000:]}
    return {"status": "ok", **json.loads(lines[-1][len("RESULT "):])}
