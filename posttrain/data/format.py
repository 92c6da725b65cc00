"""Turn dataset rows into prompt text and (prompt, completion) token ids with a tokenizer."""

from __future__ import annotations

from typing import Any

from posttrain.data.load import DataError


def prompt_text(row: dict[str, Any], tokenizer: Any) -> str:
    """The text a policy is asked to continue: `prompt` as is, or chat messages templated."""
    prompt = row.get("prompt")
    if prompt is None:
        messages = row["messages"]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        prompt = messages
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def encode_example(
    row: dict[str, Any], tokenizer: Any, source: str, index: int
) -> tuple[list[int], list[int]]:
    """`(prompt_ids, completion_ids)` for SFT; the completion ends with the EOS token."""
    if "messages" in row and row.get("completion") in (None, ""):
        messages = row["messages"]
        if messages[-1]["role"] != "assistant":
            raise DataError(
                f"{source}: row {index}: the last message must be the assistant's answer to train "
                f"on, got role {messages[-1]['role']!r}"
            )
        prompt = prompt_text({"messages": messages}, tokenizer)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise DataError(f"{source}: row {index}: the chat template does not extend the prompt")
        completion = full[len(prompt) :]
    else:
        prompt, completion = prompt_text(row, tokenizer), row.get("completion")
        if not isinstance(completion, str) or not completion:
            raise DataError(f"{source}: row {index} column 'completion' is missing or empty")
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    return prompt_ids, completion_ids + [tokenizer.eos_token_id]
