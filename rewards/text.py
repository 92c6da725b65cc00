"""Text of a completion or prompt, whether plain or conversational (a list of chat messages)."""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """A plain string as it is; a conversation's last message content; None as ''."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        if not completion:
            return ""
        last = completion[-1]
        if isinstance(last, dict) and "content" in last:
            return str(last["content"] or "")
    raise TypeError(
        f"a completion must be a string or a list of chat messages with 'content', "
        f"got {type(completion).__name__}: {str(completion)[:80]!r}"
    )


def prompt_text(prompt: Any) -> str:
    """A plain prompt as it is; a conversation as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)
    raise TypeError(f"a prompt must be a string or a list of chat messages, got {prompt!r:.80}")
