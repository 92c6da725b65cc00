"""Answer verifiers: compare a completion with the dataset's ground-truth `answer` column."""

from __future__ import annotations


def exact_answer(prompts: list, completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 when the completion, stripped of surrounding whitespace, equals the answer, else 0.0.

    Conversational completions (a list of messages) are compared by their last message's
    content. The `answer` column may hold strings or numbers.
    """
    scores = []
    for completion, truth in zip(completions, answer, strict=True):
        if isinstance(completion, list):
            completion = completion[-1]["content"] if completion else ""
        scores.append(1.0 if completion.strip() == str(truth).strip() else 0.0)
    return scores
