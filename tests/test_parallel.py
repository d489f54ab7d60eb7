"""Ulysses sequence parallelism and data parallelism (zimage_core.parallel) over gloo on the CPU.

One 4-process gloo world (torch.multiprocessing spawn) runs every case on the groups of its first 2, 3 and 4
ranks; each rank's result must equal the single-process forward (fp32, ≤ 1e-5), and for the masked CFG
batch diffusers' ZImageTransformer2DModel too. G = 4 pads the 6 heads to 8.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from tests import parallel_cases as pc
from tests.transformer_fixtures import diffusers_velocity, max_abs, rel_err
from zimage_core.parallel import batch_slice, padded_heads, sharded_length

TOL = 1e-5
REPO = str(Path(__file__).resolve().parents[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
    ref = pc.diffusers_model()
    sd = pc.converted(ref)
    return ref, pc.ours(sd), pc.ours(sd, lora=True), sd


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, reference):
    """{(case, G, rank): velocity} from the gloo world, and the ControlNet file it used."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is required (the CPU wheel has it)")
    out = tmp_path_factory.mktemp("parallel")
    cn = out / "cn.safetensors"
    pc.controlnet(cn)  # written once, read by every rank
    save_file(reference[3], str(out / "main.safetensors"))
    # The workers import this package by name (tests.parallel_cases) from the sys.path they inherit; once a
    # ComfyUI test has run, ComfyUI's own `tests` package can come first there, so the repository goes first.
    sys.path.insert(0, REPO)
    try:
        mp.spawn(pc.worker, args=(max(pc.GROUPS), _free_port(), str(out), str(out / "main.safetensors"), str(cn)),
                 nprocs=max(pc.GROUPS), join=True)
    finally:
        sys.path.remove(REPO)
    return torch.load(out / "results.pt"), cn


def _single(reference, cn, case: str) -> torch.Tensor:
    _, plain, patched, _ = reference
    data = pc.inputs(case)
    model = patched if case == "lora" else plain
    hooks = pc.control_hooks(model, pc.controlnet(cn), data["control"]) if "control" in data else None
    return pc.forward(model, case, data, hooks=hooks)


@pytest.mark.parametrize("case", pc.CASES)
def test_sharded_forward_equals_single_process(sharded, reference, case):
    results, cn = sharded
    expected = _single(reference, cn, case)
    for g in pc.GROUPS:
        for rank in range(g):
            got = results[(case, g, rank)]
            assert got.shape == expected.shape
            assert max_abs(got, expected) <= TOL, f"{case} G={g} rank {rank}: {max_abs(got, expected)}"


def test_cases_are_not_trivial(reference, sharded):
    """The ControlNet, the LoRA and the reference image each change the output (so their parity means something)."""
    results, cn = sharded
    plain = reference[1]
    cfg = pc.inputs("cfg")
    assert rel_err(results[("lora", 2, 0)], pc.forward(plain, "cfg", cfg)) > 1e-2
    control = pc.inputs("controlnet")
    assert rel_err(results[("controlnet", 3, 0)], pc.forward(plain, "controlnet", control)) > 1e-3
    omni = pc.inputs("omni")
    plain_t2i = pc.forward(plain, "omni", {k: v for k, v in omni.items() if k != "ref"})
    assert rel_err(results[("omni", 4, 0)], plain_t2i) > 1e-3


def test_masked_cfg_batch_matches_diffusers(sharded, reference):
    ref = reference[0]
    data = pc.inputs("cfg")
    expected = diffusers_velocity(ref, data["x"], data["sigma"], data["caps"])
    for g in pc.GROUPS:
        got = sharded[0][("cfg", g, 0)]
        assert rel_err(got, expected) <= TOL and max_abs(got, expected) <= TOL, g


def test_split_sizes():
    # 128 tokens: whole 32-token blocks per rank; 3 ranks need 192 (64 pad tokens, masked).
    assert [sharded_length(128, g) for g in (1, 2, 3, 4, 8)] == [128, 128, 192, 128, 256]
    assert [padded_heads(30, g) for g in (1, 2, 3, 4, 5, 6, 8)] == [30, 30, 30, 32, 30, 30, 32]
    assert [batch_slice(5, 3, r) for r in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert [batch_slice(1, 2, r) for r in range(2)] == [slice(0, 1), slice(1, 1)]


# -- worker processes (zimage_core.parallel.workers): what the ZImageParallel node runs ----------------------

def test_worker_group_runs_reuses_and_recovers_from_faults(reference):
    """Parity through the worker processes; the same workers serve later calls; Cancel abandons a step and the
    next call still gets its own result; a dead worker and a step timeout give clear errors and the next call
    starts fresh workers."""
    import os
    import signal

    from zimage_core.parallel.workers import ModelSpec, ParallelError, WorkerGroup

    ref, plain, _, sd = reference
    cfg = dataclasses.asdict(plain.config)
    group = WorkerGroup(["cpu", "cpu"], ModelSpec(cfg, "torch.float32"), lambda: iter(sd.items()),
                        mode="sequence", timeout_s=60, step_timeout_s=120)
    t2i = pc.inputs("t2i")
    single = pc.forward(plain, "t2i", t2i)

    class Cancelled(Exception):
        pass

    calls = []

    def cancel() -> None:  # ComfyUI's interrupt check: Cancel pressed once the step was sent to both workers
        calls.append(1)
        if len(calls) > 2:
            raise Cancelled

    try:
        data = pc.inputs("cfg")
        expected = diffusers_velocity(ref, data["x"], data["sigma"], data["caps"])
        got = group.forward(data["x"], data["sigma"], data["caps"])
        assert rel_err(got, expected) <= TOL and max_abs(got, expected) <= TOL
        pids = [p.pid for p in group._procs]
        with pytest.raises(Cancelled):  # Cancel while the workers compute a step
            group.forward(data["x"], data["sigma"], data["caps"], check_interrupt=cancel)
        got = group.forward(t2i["x"], t2i["sigma"], t2i["caps"])  # the same workers, another size
        assert [p.pid for p in group._procs] == pids
        assert max_abs(got, single) <= TOL  # not the abandoned step's result
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(ParallelError, match=r"worker on cpu \(rank 1\) exited.*queue the prompt again"):
            group.forward(t2i["x"], t2i["sigma"], t2i["caps"])
        assert not group.running
        got = group.forward(t2i["x"], t2i["sigma"], t2i["caps"])  # the next prompt starts fresh workers
        assert max_abs(got, single) <= TOL
        assert not set(pids) & {p.pid for p in group._procs}
        # An error inside a worker's forward (here: captions of the wrong width) names the rank and the error.
        with pytest.raises(ParallelError, match=r"worker on cpu \(rank [01]\) failed: ValueError: ZImageTransformer: "
                                                r"caption features 0 have shape \(20, 7\)"):
            group.forward(t2i["x"], t2i["sigma"], [torch.zeros(20, 7)])
        assert not group.running
        group.start()
        group.step_timeout_s = 0.001
        with pytest.raises(ParallelError, match=r"no result from the workers on cpu, cpu within"):
            group.forward(data["x"], data["sigma"], data["caps"])
        assert not group.running
    finally:
        group.close()
    assert not group.running
