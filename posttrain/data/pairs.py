"""Preference pairs: rows with `prompt`, `chosen`, `rejected` turned into token ids.

Accepted row shapes (TRL's preference formats):
- plain: `prompt`, `chosen`, `rejected` are strings;
- conversational, explicit prompt: `prompt` is a list of messages, `chosen` and `rejected` are
  lists of assistant messages (or strings);
- conversational, implicit prompt: no `prompt`; `chosen` and `rejected` are whole
  conversations that share every message but the last, which is the assistant's answer.

Plain responses end with the EOS token, as SFT completions do; conversational ones end as the
chat template ends an assistant turn. A bad row is an error naming the source, the row and the
column.

Test: `pytest tests/test_dpo_stage.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from posttrain.config.base import DataConfig
from posttrain.data.load import DataError, Rows, keep_good, load_rows

P = TypeVar("P")


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def encode_pair(row: dict[str, Any], tokenizer: Any, source: str, index: int) -> EncodedPair:
    where = f"{source}: row {index}"
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if value in (None, "", []):
            raise DataError(f"{where} has no {key!r} column (or it is empty); row columns: "
                            f"{sorted(row)}; map yours with data.columns")  # fmt: skip
        if not isinstance(value, (str, list)):
            raise DataError(
                f"{where} column {key!r} must be text or a list of messages, "
                f"got {type(value).__name__}"
            )
    prompt = row.get("prompt")
    chosen, rejected = row["chosen"], row["rejected"]
    if prompt is None:
        prompt, chosen, rejected = _split_implicit(chosen, rejected, where)
    if isinstance(prompt, list):
        _check_messages(prompt, where, "prompt")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        chosen_text = _reply_text(tokenizer, prompt, text, chosen, where, "chosen")
        rejected_text = _reply_text(tokenizer, prompt, text, rejected, where, "rejected")
        eos: list[int] = []
    elif isinstance(prompt, str) and prompt:
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise DataError(f"{where}: a text prompt needs text 'chosen' and 'rejected'")
        text, chosen_text, rejected_text = prompt, chosen, rejected
        eos = [tokenizer.eos_token_id]
    else:
        raise DataError(f"{where} column 'prompt' must be non-empty text or a list of messages")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return EncodedPair(
        ids,
        tokenizer(chosen_text, add_special_tokens=False).input_ids + eos,
        tokenizer(rejected_text, add_special_tokens=False).input_ids + eos,
    )


def _split_implicit(chosen: Any, rejected: Any, where: str) -> tuple[list, list, list]:
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(
            f"{where} has no 'prompt': then 'chosen' and 'rejected' must be whole conversations"
        )
    _check_messages(chosen, where, "chosen")
    _check_messages(rejected, where, "rejected")
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise DataError(
            f"{where}: without a 'prompt' column, 'chosen' and 'rejected' must share every "
            "message but the last (the implicit prompt)"
        )
    return chosen[:-1], chosen[-1:], rejected[-1:]


def _reply_text(tokenizer, prompt: list, prompt_text: str, reply: Any, where: str, key: str):
    messages = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply
    _check_messages(messages, where, key)
    full = tokenizer.apply_chat_template(prompt + messages, tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError(f"{where}: the chat template does not extend the prompt for {key!r}")
    return full[len(prompt_text) :]


def _check_messages(messages: Any, where: str, key: str) -> None:
    ok = (
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise DataError(
            f"{where} column {key!r} must be a non-empty list of {{'role': str, 'content': str}}"
        )


def load_pairs(
    data: DataConfig,
    encode: Callable[[dict[str, Any], int], P],
    length: Callable[[P], int],
    max_length: int,
) -> Rows:
    """Every pair row of `data` through `encode(row, index)`; a pair whose `length` passes
    `max_length` is a bad row. Bad rows stop, or are skipped and counted (`on_bad_row`)."""
    rows = load_rows(data, need=("chosen", "rejected"))

    def checked(row: dict[str, Any], index: int) -> P:
        pair = encode(row, index)
        if (longest := length(pair)) > max_length:
            raise DataError(
                f"{data.source}: row {index} has {longest} tokens (prompt + longer response), "
                f"over train.max_length={max_length}"
            )
        return pair

    return keep_good(rows, data, checked)
