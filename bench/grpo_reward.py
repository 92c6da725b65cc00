"""The reward of the GRPO benchmark (`bench/grpo.py`), in TRL's reward-function signature.

Cheap and varied: a checksum of the completion's token ids, so every group has a spread of
rewards (non-zero advantages) whatever the random model samples.
"""


def id_checksum(completions, completion_ids, **kwargs) -> list[float]:
    return [(sum(ids) % 101) / 100 for ids in completion_ids]
