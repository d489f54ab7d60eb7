"""Worker processes that hold the transformer on G devices and run its forwards sequence- or data-parallel.

The caller (ComfyUI's sampler loop, on the main process) keeps no weights: `WorkerGroup.forward` hands each
worker the step's inputs and returns rank 0's velocity. The workers are spawned once (`start`), reused for
every forward, and stopped by `close` (the ComfyUI node ties that to the model's lifetime).

Transport:
- between the workers: torch.distributed only (NCCL on GPUs, gloo on the CPU), with the collective timeout
  `timeout_s` (init_process_group's timeout; NCCL's watchdog aborts a collective that exceeds it, so a
  dead or stuck rank fails the others instead of hanging them);
- main process ↔ workers: Python multiprocessing queues carrying plain data (tensors as bytes, no shared
  memory: /dev/shm is often 64 MiB in containers). The weights go to rank 0 one tensor at a time (a bounded
  queue) and rank 0 broadcasts each to the other ranks with `dist.broadcast`.

The workers are started through `runpy.run_path` on `_worker_main.py`, which imports this package as the
top-level `zimage_core` (the main process may know it under a ComfyUI custom-node name), and with the main
module hidden from the spawn bootstrap (ComfyUI's main.py must not run again in each worker).

Faults: a worker that raises (e.g. out of memory) sends its message; a worker that dies is noticed by its
exit; a step that takes longer than `step_timeout_s` is abandoned. Each raises `ParallelError` naming the
rank and device, and closes the group: the next `forward` starts a fresh one (a device that still fails
fails again, clearly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import runpy
import socket
import sys
import time
import types
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MODES = ("sequence", "data")
REPORTED_EXIT = 3  # a worker's exit code after it sent its error to the main process
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


class ParallelError(RuntimeError):
    """A worker failed, died or timed out; the message names it and what to do."""


def _pack(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """A tensor as (dtype, shape, bytes): pickled by value, not through shared memory."""
    t = t.detach().to("cpu").contiguous()
    return str(t.dtype), tuple(t.shape), t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _unpack(packed: tuple[str, tuple[int, ...], bytes], device: torch.device | str = "cpu") -> torch.Tensor:
    dtype_name, shape, data = packed
    dtype = getattr(torch, dtype_name.removeprefix("torch."))
    if not data:
        return torch.empty(shape, dtype=dtype, device=device)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape).to(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _plain_main() -> Iterator[None]:
    """Hide the main module from multiprocessing's spawn bootstrap while workers start (it would import the
    main script again in each worker: ComfyUI's main.py, or the test runner)."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


@dataclasses.dataclass
class ModelSpec:
    """What a worker builds: the transformer's config (TransformerConfig fields), the dtype its weights are
    held in, the compute dtype (None: the weights'), and the fp8-attention flag."""

    config: dict[str, Any]
    dtype: str
    compute_dtype: str | None = None
    fp8_attention: bool = False


class WorkerGroup:
    """G worker processes on `devices` ("cuda:0", ... or "cpu" for tests), `mode` "sequence" (Ulysses: one
    image split across the devices) or "data" (the batch split across them)."""

    def __init__(self, devices: list[str], spec: ModelSpec, weights: Callable[[], Iterator[tuple[str, torch.Tensor]]],
                 mode: str = "sequence", timeout_s: float = 300.0, step_timeout_s: float = 1800.0,
                 backend: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"parallel mode must be one of {MODES}, got {mode!r}.")
        if len(devices) < 2:
            raise ValueError(f"a parallel group needs at least 2 devices, got {devices}.")
        self.devices = list(devices)
        self.spec = spec
        self.weights = weights
        self.mode = mode
        self.timeout_s = float(timeout_s)
        self.step_timeout_s = float(step_timeout_s)
        self.backend = backend or ("nccl" if self.devices[0].startswith("cuda") else "gloo")
        self._procs: list[Any] = []
        self._requests: list[Any] = []
        self._results: Any = None
        self._step = 0
        # ControlNets the workers may need: key -> (ControlNetConfig fields, weights); loaded on first use.
        self.controlnets: dict[str, tuple[dict, Callable[[], Iterator[tuple[str, torch.Tensor]]]]] = {}
        self._loaded: set[str] = set()

    @property
    def world(self) -> int:
        return len(self.devices)

    @property
    def running(self) -> bool:
        return bool(self._procs)

    # -- lifetime ------------------------------------------------------------------------------
    def start(self, check_interrupt: Callable[[], None] | None = None) -> None:
        """Spawn the workers and send them the weights (once; `forward` calls it when needed)."""
        if self._procs:
            return
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._requests = [ctx.Queue(maxsize=8) for _ in self.devices]
        port = _free_port()
        script = str(Path(__file__).with_name("_worker_main.py"))
        root = str(Path(__file__).resolve().parents[2])  # the folder that holds zimage_core
        with _plain_main():
            for rank, device in enumerate(self.devices):
                args = {"rank": rank, "devices": self.devices, "port": port, "backend": self.backend,
                        "timeout_s": self.timeout_s, "mode": self.mode, "spec": dataclasses.asdict(self.spec),
                        "requests": self._requests[rank], "results": self._results}
                proc = ctx.Process(target=runpy.run_path, args=(script,), daemon=True,
                                   kwargs={"init_globals": {"ZIMAGE_WORKER": args, "ZIMAGE_ROOT": root},
                                           "run_name": "__zimage_worker__"},
                                   name=f"zimage-parallel-{rank}-{device}")
                proc.start()
                self._procs.append(proc)
        log.info("Z-Image parallel: %d workers (%s, %s) started on %s", self.world, self.mode, self.backend,
                 ", ".join(self.devices))
        try:
            for name, tensor in self.weights():
                self._put(0, ("weight", name, _pack(tensor)), check_interrupt)
            self._put(0, ("weights_done",), check_interrupt)
            self._wait("ready", self.world, check_interrupt, self.timeout_s + 60 * self.world)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        procs, self._procs = self._procs, []
        self._loaded = set()
        for q in self._requests:
            with contextlib.suppress(Exception):
                q.put_nowait(("stop",))
        deadline = time.monotonic() + 10
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
        for q in [*self._requests, *([self._results] if self._results is not None else [])]:
            with contextlib.suppress(Exception):
                q.cancel_join_thread()
                q.close()
        self._requests, self._results = [], None
        if procs:
            log.info("Z-Image parallel: workers on %s stopped", ", ".join(self.devices))

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- calls ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, caps: list[torch.Tensor], *,
                image_pos: tuple[float, float, float, float] | None = None,
                refs: dict[str, list[torch.Tensor | None]] | None = None, omni_style: str = "comfyui",
                controls: list[dict] | None = None,
                check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
        """The velocity for (x, sigma, caps), as `ZImageTransformer.forward`, computed by the workers.

        `controls`: active Fun ControlNets, each {"key": a key of `self.controlnets`, "control": the control
        latent, "strength", "style", "axes_dims", "rope_theta"} (zimage_core.controlnet.ControlRun's arguments)."""
        self.start(check_interrupt)
        self._step += 1
        controls = list(controls or [])
        request = {"step": self._step, "x": _pack(x), "sigma": _pack(torch.as_tensor(sigma).reshape(-1)),
                   "caps": [_pack(c) for c in caps], "image_pos": image_pos, "omni_style": omni_style,
                   "refs": {k: [None if t is None else _pack(t) for t in v] for k, v in (refs or {}).items()},
                   "controls": [{**c, "control": _pack(c["control"])} for c in controls]}
        try:
            for key in dict.fromkeys(c["key"] for c in controls):
                self._load_controlnet(key, check_interrupt)
            for rank in range(self.world):
                self._put(rank, ("forward", request), check_interrupt)
            out = self._wait("result", 1, check_interrupt, self.step_timeout_s, step=self._step)[0]
        except ParallelError:
            self.close()
            raise
        return _unpack(out).to(device=x.device, dtype=x.dtype)

    def _load_controlnet(self, key: str, check_interrupt: Callable[[], None] | None) -> None:
        if key in self._loaded:
            return
        config, weights = self.controlnets[key]
        for rank in range(self.world):
            self._put(rank, ("controlnet", key, config), check_interrupt)
        for name, tensor in weights():
            self._put(0, ("weight", name, _pack(tensor)), check_interrupt)
        self._put(0, ("weights_done",), check_interrupt)
        self._wait("loaded", self.world, check_interrupt, self.timeout_s)
        self._loaded.add(key)

    def _put(self, rank: int, message: tuple, check_interrupt: Callable[[], None] | None) -> None:
        while True:
            self._check_alive()
            if check_interrupt is not None:
                check_interrupt()
            try:
                self._requests[rank].put(message, timeout=0.2)
                return
            except queue.Full:
                continue

    def _check_alive(self, unreported_only: bool = False) -> None:
        dead = [(rank, p.exitcode) for rank, p in enumerate(self._procs) if not p.is_alive()]
        unreported = [d for d in dead if d[1] != REPORTED_EXIT]
        if not (unreported if unreported_only else dead):
            return
        if not unreported:  # every dead worker sent its error first: that error says what happened
            report = self._reported_error()
            if report is not None:
                raise report
        # A worker that died without a report (killed, crashed) is the cause of its peers' collective errors.
        rank, code = (unreported or dead)[0]
        raise ParallelError(
            f"Z-Image parallel: the worker on {self.devices[rank]} (rank {rank}) exited (code {code}). "
            "The workers are stopped; queue the prompt again to restart them, or remove the "
            "ZImageParallel node to run on one GPU.")

    def _reported_error(self) -> ParallelError | None:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                message = self._results.get(timeout=0.2)
            except queue.Empty:
                continue
            if message[0] == "error":
                return self._error(message)
        return None

    def _error(self, message: tuple) -> ParallelError:
        _, rank, text = message
        return ParallelError(f"Z-Image parallel: the worker on {self.devices[rank]} (rank {rank}) failed: {text} "
                             "The workers are stopped; the next prompt starts them again.")

    def _wait(self, kind: str, count: int, check_interrupt: Callable[[], None] | None, timeout_s: float,
              step: int | None = None) -> list[Any]:
        got: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < count:
            if check_interrupt is not None:
                check_interrupt()  # Cancel: a late result of this step is dropped by its step number
            try:
                message = self._results.get(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
            except queue.Empty:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise ParallelError(
                        f"Z-Image parallel: no {kind} from the workers on {', '.join(self.devices)} within "
                        f"{timeout_s:.0f} s; they are stopped. Queue the prompt again to restart them.") from None
                continue
            if message[0] == "error":
                time.sleep(1.0)  # a rank that died is the cause of its peers' collective errors: name it first
                self._check_alive(unreported_only=True)
                raise self._error(message)
            if message[0] != kind or (step is not None and message[1] != step):
                continue  # e.g. the result of a step that Cancel abandoned
            got.append(message[-1])
        return got


# -- the worker side ---------------------------------------------------------------------------------
def _batch_part(omni: Any, sl: slice) -> Any:
    """Omni inputs of samples `sl` (tensors of batch 1 are shared by every sample)."""
    def cut(items: Any) -> list:
        return [t if t is None or t.ndim < 3 or t.shape[0] == 1 else t[sl] for t in items]
    return dataclasses.replace(omni, ref_latents=cut(omni.ref_latents), captions=cut(omni.captions),
                               siglip=cut(omni.siglip))


def control_hooks(model: Any, nets: dict, controls: list[dict], sl: slice | None = None) -> Any:
    """ControlHooks for active ControlNets (None without any): `controls` as `WorkerGroup.forward` takes them
    (`key` into `nets`), for the samples `sl` of the batch (None: all)."""
    if not controls:
        return None
    from ..controlnet import ControlRun
    from ..controlnet.model import ControlHooks

    runs = []
    for c in controls:
        control = c["control"]
        if sl is not None and control.shape[0] > 1:
            # The rows this slice of the batch would get: ControlRun cycles the control rows over the batch.
            control = control[torch.arange(sl.start, sl.stop, device=control.device) % control.shape[0]]
        runs.append(ControlRun(nets[c["key"]], control, c["strength"], style=c["style"],
                               axes_dims=tuple(c["axes_dims"]), rope_theta=c["rope_theta"]))
    return ControlHooks(model, runs)


def _run(model: Any, mode: str, request: dict, device: torch.device, nets: dict) -> torch.Tensor:
    """One forward of a request on this rank (every rank runs it; each ends with the whole output)."""
    from ..transformer import OmniInputs
    from .data import data_parallel
    from .ulysses import SequenceParallelRunner

    x = _unpack(request["x"], device)
    sigma = _unpack(request["sigma"], device)
    caps = [_unpack(c, device) for c in request["caps"]]
    refs = request["refs"]

    def dev(items: list) -> list:
        return [None if t is None else _unpack(t, device) for t in items]

    omni = None
    if refs.get("ref_latents"):
        omni = OmniInputs(dev(refs["ref_latents"]), dev(refs.get("captions", [])), dev(refs.get("siglip", [])),
                          style=request["omni_style"])
    pos = tuple(request["image_pos"]) if request["image_pos"] else None
    with torch.no_grad():
        controls = [{**c, "control": _unpack(c["control"], device)} for c in request.get("controls") or []]
        if mode != "data":
            hooks = control_hooks(model, nets, controls)
            return model(x, sigma, caps, image_pos=pos, omni=omni, runner=SequenceParallelRunner(None, hooks=hooks))

        def part(sl: slice) -> torch.Tensor:
            return model(x[sl], sigma[sl] if sigma.numel() > 1 else sigma, caps[sl] if len(caps) > 1 else caps,
                         image_pos=pos, omni=None if omni is None else _batch_part(omni, sl),
                         hooks=control_hooks(model, nets, controls, sl))
        return data_parallel(part, x.shape[0], x, None)


def _receive_weights(rank: int, requests: Any, module: torch.nn.Module, device: torch.device) -> None:
    """Fill `module`'s tensors: rank 0 reads them from the main process and broadcasts each to the others."""
    import torch.distributed as dist

    params = dict(module.state_dict(keep_vars=True))
    loaded = set()
    while True:
        if rank == 0:
            message = requests.get()
            header = [message[0], message[1] if message[0] == "weight" else None]
        else:
            header = [None, None]
        dist.broadcast_object_list(header, src=0)
        if header[0] != "weight":
            break
        name = header[1]
        if name not in params:
            raise KeyError(f"unexpected weight {name!r}")
        dest = params[name]
        if rank == 0:
            value = _unpack(message[2], device)
            if value.shape != dest.shape:
                raise ValueError(f"weight {name} has shape {tuple(value.shape)}, the model {tuple(dest.shape)}")
            dest.data.copy_(value)
        dist.broadcast(dest.data, src=0)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise KeyError(f"weights missing: {missing[:5]}")


def serve(rank: int, devices: list[str], port: int, backend: str, timeout_s: float, mode: str, spec: dict,
          requests: Any, results: Any) -> None:
    """One worker: join the group, receive the weights, then run forwards until told to stop."""
    import torch.distributed as dist

    from ..transformer import TransformerConfig, ZImageTransformer

    world = len(devices)
    device = torch.device(devices[rank])
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        cfg = dict(spec["config"])
        cfg["axes_dims"], cfg["axes_lens"] = tuple(cfg["axes_dims"]), tuple(cfg["axes_lens"])
        with torch.device("meta"):
            model = ZImageTransformer(TransformerConfig(**cfg), dtype=_DTYPES[spec["dtype"]])
        model = model.to_empty(device=device).eval().requires_grad_(False)
        if spec.get("compute_dtype"):
            model.compute_dtype = _DTYPES[spec["compute_dtype"]]
        if spec.get("fp8_attention"):
            model.set_fp8_attention(True)
        _receive_weights(rank, requests, model, device)
        results.put(("ready", rank))
        nets: dict[str, Any] = {}
        while True:
            message = requests.get()
            if message[0] == "stop":
                break
            if message[0] == "controlnet":  # a Fun ControlNet's weights, kept under its key
                from ..controlnet.model import ControlNetConfig, ZImageControlNet

                _, key, config = message
                with torch.device("meta"):
                    net = ZImageControlNet(ControlNetConfig(**config), dtype=model.dtype)
                net = net.to_empty(device=device).eval().requires_grad_(False)
                _receive_weights(rank, requests, net, device)
                nets[key] = net
                results.put(("loaded", key, rank))
                continue
            request = message[1]
            out = _run(model, mode, request, device, nets)
            if rank == 0:
                results.put(("result", request["step"], _pack(out)))
    except BaseException as e:  # noqa: BLE001 - reported to the main process, which raises it
        text = f"{type(e).__name__}: {e}"
        if isinstance(e, torch.OutOfMemoryError):
            text = f"out of memory on {device} ({e}). Use more GPUs, smaller images, or free GPU memory."
        with contextlib.suppress(Exception):
            results.put(("error", rank, text))
        raise SystemExit(REPORTED_EXIT) from None
    finally:
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()
