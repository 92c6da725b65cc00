"""Option checks shared by the rule rewards (`rewards/rules.py`, `rewards/length_rules.py`): each
raises a `ValueError` that names the reward, the option, what was expected and what was given."""

from __future__ import annotations

from typing import Any


def bad(reward: str, option: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"{reward}: option {option!r} must be {expected}, got {got!r}")


def require_bool(reward: str, option: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise bad(reward, option, "true or false", value)


def require_int(reward: str, option: str, value: Any, minimum: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise bad(reward, option, f"an integer >= {minimum}", value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_string_list(value: Any) -> bool:
    """A list or tuple of strings (a bare string is refused: it would be read letter by letter)."""
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
