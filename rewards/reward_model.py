"""Reward-model scorer: a local sequence-classification model scoring (prompt, completion).

    rewards: [{name: reward_model, args: {path: runs/x/rm/model, batch_size: 16}}]

The model (any `AutoModelForSequenceClassification` with one label, such as the output of an
`rm` stage) is loaded once when the rubric is built. Each (prompt, completion) becomes one
text: through the tokenizer's chat template when the prompt is a conversation and the
tokenizer has one, else the prompt followed by the completion, which is how the `rm` stage
trains on plain pairs. Samples are scored in padded batches (the model pools at each row's
last real token, so padding does not change a score); a sample longer than `max_length`
tokens fails alone (`Failed`, counted by the rubric) instead of being silently truncated.

Test: `pytest tests/test_reward_model_scorer.py`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rewards.text import completion_text, prompt_text
from rewards.types import Failed


def reward_model(
    *,
    path: str,
    batch_size: int = 16,
    max_length: int = 2048,
    device: str = "cpu",
    dtype: str = "float32",
) -> Callable:
    """Score each (prompt, completion) with a sequence-classification reward model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if batch_size < 1:
        raise ValueError(f"reward_model: batch_size must be at least 1, got {batch_size}")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"reward_model: dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtypes[dtype])
    except OSError as err:
        raise ValueError(f"reward_model: cannot load a model from {path!r}: {err}") from err
    if model.config.num_labels != 1:
        raise ValueError(
            f"reward_model: {path!r} has {model.config.num_labels} labels; a reward model "
            "has exactly one (a scalar score)"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    # Scoring needs no KV cache; decoder models would build one per batch in eval mode (for a
    # 7B model, 32 x 1,024 tokens: ~4 GB of keys and values kept through the forward).
    model.config.use_cache = False
    model.to(device).eval()
    lock = threading.Lock()  # one forward at a time when the rubric runs rewards in threads

    def score_texts(texts: list[str]) -> list[float]:
        encoded = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        with lock, torch.inference_mode():
            logits = model(**encoded.to(device)).logits
        return logits[:, 0].float().tolist()

    def reward_model_score(prompts: list, completions: list, **kwargs: Any) -> list:
        texts = [_join(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        out: list[Any] = [None] * len(texts)
        fits = []
        for i, length in enumerate(lengths):
            if length > max_length:
                out[i] = Failed(f"{length} tokens, more than max_length={max_length}")
            else:
                fits.append(i)
        for start in range(0, len(fits), batch_size):
            chunk = fits[start : start + batch_size]
            for i, value in zip(chunk, score_texts([texts[i] for i in chunk]), strict=True):
                out[i] = value
        return out

    reward_model_score.__name__ = "reward_model"
    return reward_model_score


def _join(tokenizer, prompt: Any, completion: Any) -> str:
    """The text the model scores: chat template for conversations, else prompt + completion."""
    if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None):
        reply = completion if isinstance(completion, list) else None
        messages = prompt + (
            reply or [{"role": "assistant", "content": completion_text(completion)}]
        )
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return prompt_text(prompt) + completion_text(completion)
