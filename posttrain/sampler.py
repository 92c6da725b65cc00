"""Draw prompts for iterative stages: a seeded shuffle per epoch, position kept as state."""

from __future__ import annotations

import random
from typing import Any


class PromptSampler:
    def __init__(self, rows: list[dict[str, Any]], batch_size: int, seed: int) -> None:
        if batch_size > len(rows):
            raise ValueError(f"a batch of {batch_size} exceeds the {len(rows)} rows of the data")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffled(0)

    def next(self) -> list[dict[str, Any]]:
        if self.position + self.batch_size > len(self.rows):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._shuffled(self.epoch)
        chosen = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return [self.rows[i] for i in chosen]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order


class EpochBatches:
    """Endless batches of indices for offline stages: the order is reshuffled (in place, by one
    seeded generator) at each epoch; the last partial batch of an epoch is dropped unless the
    data is smaller than one batch. The position is state, so a resumed stage continues the
    same sequence of batches."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.position = 0, 0
        self._restart(0)

    def next(self) -> list[int]:
        if self.size < self.batch_size:
            batch = list(self._order)
            self._restart(self.epoch + 1)
            return batch
        if self.position + self.batch_size > self.size:
            self._restart(self.epoch + 1)
        batch = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self._restart(state["epoch"])
        self.position = state["position"]

    def _restart(self, epoch: int) -> None:
        rng, order = random.Random(self.seed), list(range(self.size))
        for _ in range(epoch + 1):  # the same shuffles as one generator run epoch after epoch
            rng.shuffle(order)
        self.epoch, self.position, self._order = epoch, 0, order
