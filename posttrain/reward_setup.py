"""Build a `rewards.Rubric` from the config's reward list, checked against the data columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config.schema import RewardErrorPolicy, RewardSpec
from rewards import RewardTerm, Rubric, resolve_reward

NOT_PASSED = ("prompt", "completion")  # as TRL: these columns are not reward keywords


def reward_columns(rows: list[dict]) -> dict[str, list]:
    """Dataset columns as keyword lists for reward functions."""
    keys = [k for k in rows[0] if k not in NOT_PASSED]
    return {k: [row.get(k) for row in rows] for k in keys}


def reward_inputs(
    rows: list[dict], prompts: list[str], completions: list[str]
) -> tuple[list[Any], list[Any]]:
    """Prompts and completions in TRL's two formats: text for text prompts; for chat data
    (a `prompt` list or `messages`), the prompt's messages and the completion as one
    assistant message, so reward functions written for TRL's conversational format work."""
    out_prompts, out_completions = [], []
    for row, prompt, completion in zip(rows, prompts, completions, strict=True):
        messages = row.get("prompt") if isinstance(row.get("prompt"), list) else None
        if messages is None and isinstance(row.get("messages"), list):
            messages = row["messages"]
            messages = (
                messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
            )
        if messages is None:
            out_prompts.append(prompt)
            out_completions.append(completion)
        else:
            out_prompts.append(messages)
            out_completions.append([{"role": "assistant", "content": completion}])
    return out_prompts, out_completions


def build_rubric(
    specs: list[RewardSpec],
    columns: list[str],
    base_dir: Path | None,
    policy: RewardErrorPolicy | None = None,
) -> Rubric:
    """Resolve and build every reward; a name, option, column or gate error fails here."""
    terms = []
    for spec in specs:
        fn = resolve_reward(spec.name, base_dir, spec.args)
        label = spec.label or short_name(spec.name)
        terms.append(RewardTerm(label, fn, spec.weight, spec.gate, spec.gate_min, spec.timeout))
    policy = policy or RewardErrorPolicy(on_error="raise")
    return Rubric(
        terms,
        columns=[c for c in columns if c not in NOT_PASSED],
        on_error=policy.on_error,
        max_error_rate=policy.max_error_rate,
    )


def short_name(name: str) -> str:
    """`./r.py:brevity` -> `brevity`; `pkg.mod:fn` -> `fn`; built-ins stay as they are."""
    return name.rsplit(":", 1)[-1].rsplit(".", 1)[-1] if (":" in name or "." in name) else name
