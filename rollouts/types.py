"""Plain data that crosses from the rollout engines to the trainer, and the engine protocol.

Nothing here imports torch or an engine: a `Sample` is strings, token-id lists and floats, so
rewards and trainers can consume it without knowing which engine produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature == 0` means greedy decoding."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    """Seed for this call's sampling; None draws from the engine's own generator."""
    ignore_eos: bool = False
    """Keep sampling past end-of-sequence tokens up to `max_new_tokens` (benchmarks)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Sample:
    """One completion of one prompt.

    `logprobs[i]` is the engine's log-probability of `completion_ids[i]` under the raw model
    distribution (temperature 1, no top-p), which is what the trainer recomputes and compares.
    """

    prompt: str
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    policy_version: int


@dataclass(frozen=True)
class Group:
    """All samples of one prompt, with the prompt's dataset row (for rewards)."""

    prompt: str
    samples: list[Sample]
    row: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class RolloutEngine(Protocol):
    """What the training loop needs from an engine."""

    name: str

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingParams, rows: list[dict] | None = None
    ) -> list[Group]:
        """Sample `n` completions for each prompt; one `Group` per prompt, in order."""
        ...

    def load_weights(self, source: Any, version: int) -> None:
        """Make the engine generate with `source`'s weights; tag later samples with `version`."""
        ...

    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per-token logprobs of whole token sequences (position 0: 0.0), for sync probes."""
        ...

    def sleep(self) -> None:
        """Free memory while the trainer updates, where the engine supports it (else no-op)."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...
