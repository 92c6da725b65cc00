"""Build a `rewards.Rubric` from the config's reward list, checked against the data columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config.schema import RewardErrorPolicy, RewardSpec
from rewards import RewardTerm, Rubric, resolve_reward

NOT_PASSED = ("prompt", "completion")  # as TRL: these columns are not reward keywords
LEARNED_REWARDS = ("judge_score", "reward_model")
"""Built-in rewards that a model computes: a policy can learn to please them instead of
solving the task (`docs/results.md`: an ungated reward model's score rose while held-out
accuracy fell from 15.7% to 2.3%)."""


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


def ungated_learned_rewards(specs: list[RewardSpec]) -> list[str]:
    """Warnings for learned rewards (`LEARNED_REWARDS`) trained on (weight != 0) without a
    gate beside other trained rewards, which could gate them. A learned reward alone is plain
    RLHF (the KL penalty is its guard) and gets none."""
    others = [s.label or short_name(s.name) for s in specs
              if s.name not in LEARNED_REWARDS and s.weight != 0]  # fmt: skip
    if not others:
        return []
    return [
        f"reward {spec.label or short_name(spec.name)!r} is a learned score ({spec.name}) "
        f"trained on without a gate (weight {spec.weight}) beside {others}: a policy can learn "
        f"to please it instead of solving the task. Gate it on a verifier (e.g. `gate: "
        f"{others[0]}`) or log it with weight 0 (docs/rewards.md, 'Combining rewards')"
        for spec in specs
        if spec.name in LEARNED_REWARDS and spec.weight != 0 and spec.gate is None
    ]


def short_name(name: str) -> str:
    """`./r.py:brevity` -> `brevity`; `pkg.mod:fn` -> `fn`; built-ins stay as they are."""
    return name.rsplit(":", 1)[-1].rsplit(".", 1)[-1] if (":" in name or "." in name) else name
