"""The built-in arithmetic task, `builtin://arithmetic`: "a+b=" -> "c" for 0 <= a, b < 100.

All 10,000 problems are shuffled once with a fixed seed; the first 1,000 are the `test` split
and the rest `train`, so the splits are disjoint and identical on every machine.
"""

from __future__ import annotations

import random

SPLIT_SEED = 1234
TEST_SIZE = 1000


def arithmetic_rows(split: str) -> list[dict[str, str]]:
    problems = [(a, b) for a in range(100) for b in range(100)]
    random.Random(SPLIT_SEED).shuffle(problems)
    chosen = {"test": problems[:TEST_SIZE], "train": problems[TEST_SIZE:]}.get(split)
    if chosen is None:
        raise ValueError(f"builtin://arithmetic has splits 'train' and 'test', not {split!r}")
    return [
        {"prompt": f"{a}+{b}=", "completion": str(a + b), "answer": str(a + b)} for a, b in chosen
    ]


def arithmetic_pair_rows(split: str) -> list[dict[str, str]]:
    """`builtin://arithmetic_pairs`: the same problems as preference pairs.

    `chosen` is the correct sum; `rejected` a near miss (off by 1 to 10, or the digits
    reversed), the kind of answer a half-trained model gives, seeded per problem.
    """
    pairs = []
    for row in arithmetic_rows(split):
        truth = int(row["answer"])
        rng = random.Random(f"{SPLIT_SEED}-{row['prompt']}")
        wrong = truth
        while wrong == truth or wrong < 0:
            flipped = int(str(truth)[::-1])
            wrong = (
                flipped if rng.random() < 0.2 else truth + rng.choice([-1, 1]) * rng.randint(1, 10)
            )
        pairs.append({**row, "chosen": row["answer"], "rejected": str(wrong)})
    return pairs
