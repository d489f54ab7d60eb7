"""Data parallelism: the samples of one batch split across the ranks of a torch.distributed group.

Each rank runs the whole transformer on its contiguous slice of the batch (`batch_slice`: the first
B mod G ranks take one sample more) and the velocities are gathered (`all_gather`, padded to the largest
slice) so every rank ends with the whole batch. For ComfyUI's CFG this is the conditional and the
unconditional halves on two GPUs; for a batch of N images, N/G images per GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def batch_slice(batch: int, world: int, rank: int) -> slice:
    """Rank `rank`'s samples of a batch of `batch` (torch.tensor_split's split: sizes differ by at most 1)."""
    per, extra = divmod(batch, world)
    start = rank * per + min(rank, extra)
    return slice(start, start + per + (1 if rank < extra else 0))


def data_parallel(forward: Callable[[slice], torch.Tensor], batch: int, like: torch.Tensor,
                  group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """`forward(sl)` on this rank's slice of the batch, gathered from every rank into (batch, ...).

    `like` gives the per-sample shape and dtype of the output (e.g. the latent x). A rank whose slice is
    empty (batch < world) contributes nothing and runs no forward."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [batch_slice(batch, world, r) for r in range(world)]
    most = max(s.stop - s.start for s in sizes)
    mine = sizes[rank]
    local = torch.zeros(most, *like.shape[1:], dtype=like.dtype, device=like.device)
    if mine.stop > mine.start:
        local[:mine.stop - mine.start] = forward(mine)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    return torch.cat([p[:s.stop - s.start] for p, s in zip(parts, sizes, strict=True)], 0)
