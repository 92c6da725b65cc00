"""The reward-model scorer (`reward_model` reward) on a tiny sequence-classification model.

The model is the tiny arithmetic network with a one-label score head (random, seeded), saved
as any `rm` stage output would be. Run: `pytest tests/test_reward_model_scorer.py`.
"""

from __future__ import annotations

import pytest
import torch

from rewards import Failed, RewardError, RewardTerm, Rubric, resolve_reward

PROMPTS = ["1+2=", "17*3=", "9-4=", "100+200="]
COMPLETIONS = ["3", "51", "five", "300 and some more text"]


@pytest.fixture(scope="module")
def rm_path(tiny_path, tmp_path_factory) -> str:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    folder = tmp_path_factory.mktemp("rm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def direct_scores(path: str, texts: list[str]) -> list[float]:
    """One unpadded forward per text: the reference the batched scorer must match."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            out.append(model(**ids).logits[0, 0].item())
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_scores_match_unpadded_forwards_at_any_batch_size(rm_path, batch_size):
    fn = resolve_reward("reward_model", args={"path": rm_path, "batch_size": batch_size})
    scores = fn(prompts=PROMPTS, completions=COMPLETIONS)
    expected = direct_scores(rm_path, [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == len(scores)  # distinct texts, distinct scores


def test_scoring_builds_no_kv_cache(rm_path, monkeypatch):
    """A decoder reward model scores without a KV cache (transformers builds one per forward in
    eval mode unless told not to)."""
    from transformers import DynamicCache

    fn = resolve_reward("reward_model", args={"path": rm_path})
    built = []
    init = DynamicCache.__init__
    monkeypatch.setattr(
        DynamicCache, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k)
    )
    scores = fn(prompts=PROMPTS, completions=COMPLETIONS)
    assert len(scores) == len(COMPLETIONS) and built == []


def test_conversational_completion_scores_its_text(rm_path):
    fn = resolve_reward("reward_model", args={"path": rm_path})
    plain = fn(prompts=PROMPTS[:2], completions=COMPLETIONS[:2])
    chat = fn(
        prompts=PROMPTS[:2],
        completions=[[{"role": "assistant", "content": c}] for c in COMPLETIONS[:2]],
    )
    assert chat == pytest.approx(plain, abs=1e-6)


def test_too_long_sample_fails_alone(rm_path):
    fn = resolve_reward("reward_model", args={"path": rm_path, "max_length": 8})
    out = fn(prompts=["1+2=", "1+2="], completions=["3", "3" * 40])
    assert isinstance(out[0], float)
    assert isinstance(out[1], Failed) and "more than max_length=8" in out[1].error
    rubric = Rubric([RewardTerm("rm", fn)], on_error="count", max_error_rate=0.5)
    scores = rubric.score(["1+2=", "1+2="], ["3", "3" * 40])
    assert scores.components["rm"][1] is None and scores.errors == {"rm": 1}
    # "1+2=" is 4 tokens and each "3" one more (digits are single tokens): 44 > 8
    with pytest.raises(RewardError, match="'rm' failed on completion 1: 44 tokens"):
        Rubric([RewardTerm("rm", fn)]).score(["1+2=", "1+2="], ["3", "3" * 40])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"dtype": "int8"}, "dtype must be one of"),
    ],
)
def test_bad_options(rm_path, args, message):
    from rewards import RewardLookupError

    with pytest.raises(RewardLookupError, match=message):
        resolve_reward("reward_model", args={"path": rm_path, **args})


def test_missing_model_and_policy_model_are_clear_errors(tmp_path, tiny_path):
    from rewards import RewardLookupError

    with pytest.raises(RewardLookupError, match="cannot load a model from"):
        resolve_reward("reward_model", args={"path": str(tmp_path / "nope")})
    with pytest.raises(RewardLookupError, match="needs option\\(s\\) \\['path'\\]"):
        resolve_reward("reward_model")
