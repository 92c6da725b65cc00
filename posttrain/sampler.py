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

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order
