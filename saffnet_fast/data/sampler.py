"""A resumable, DDP-aware sampler that also hands out per-sample augmentation seeds."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ResumableSampler(Sampler):
    """Yields ``(dataset index, augmentation seed)`` pairs.

    The order of epoch ``e`` is a permutation drawn from a generator seeded by (seed, e), so
    it depends only on (seed, epoch) and can be recreated after a restart; ``set_position``
    skips the samples this rank already consumed in the epoch. With ``world_size`` > 1 each
    rank takes every ``world_size``-th item of the permutation, padded like
    ``DistributedSampler`` so ranks see equal counts.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1):
        if length < 1:
            raise ValueError("dataset is empty: expected at least one sample")
        self.length = length
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self.per_rank = math.ceil(length / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.position = 0

    def set_position(self, position: int) -> None:
        """Start the current epoch after ``position`` samples (this rank's count)."""
        self.position = int(position)

    def _order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world_size
        order += order[: total - len(order)]
        return order[self.rank:total:self.world_size]

    def __iter__(self):
        for index in self._order()[self.position:]:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.per_rank - self.position
