"""Which samples each trajectory draws, reproducibly, independent of processes and resumes.

Trajectory i of a run with seed s draws its class labels from seed (s, i) and gives
every sample j its own noise generator seeded by (s, i, j). So a run resumed at any
step replays exactly the same trajectories, and N processes that each take a slice of
the batch see exactly the samples one process would see in the whole batch.
"""

from __future__ import annotations

import torch

_LABEL_STREAM, _NOISE_STREAM = 1, 2


def mixed_seed(*parts: int) -> int:
    """One seed from several integers (run seed, stream, trajectory, sample), the same on
    every machine and process."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (2**63 - 1)
    return value


def trajectory_batch(seed: int, index: int, batch_size: int, num_classes: int,
                     rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, list[torch.Generator]]:
    """This process's labels and per-sample generators for trajectory `index`."""
    if batch_size % world_size:
        raise ValueError(f"distill.batch_size={batch_size} must be divisible by the number "
                         f"of processes ({world_size}).")
    labels = torch.randint(num_classes, (batch_size,),
                           generator=torch.Generator().manual_seed(mixed_seed(seed, _LABEL_STREAM, index)))
    per_process = batch_size // world_size
    mine = range(rank * per_process, (rank + 1) * per_process)
    generators = [torch.Generator().manual_seed(mixed_seed(seed, _NOISE_STREAM, index, j)) for j in mine]
    return labels[mine.start:mine.stop], generators
