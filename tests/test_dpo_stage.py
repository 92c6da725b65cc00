"""The offline DPO stage: pair encoding, the paired forward, micro-batching, and a real run.

Run: `pytest tests/test_dpo_stage.py`.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.algorithms import dpo
from posttrain.config import load_config
from posttrain.config.schema import DPOParams, OptimConfig
from posttrain.data.load import DataError
from posttrain.data.pairs import encode_pair
from posttrain.learner import Learner
from posttrain.logprobs import token_logprobs
from posttrain.pipeline import run_pipeline

USER = [{"role": "user", "content": "1+1="}]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_plain_pair_ends_with_eos(tiny):
    _, tok = tiny
    pair = encode_pair({"prompt": "1+1=", "chosen": "2", "rejected": "3"}, tok, "d", 0)
    assert pair.prompt_ids == ids(tok, "1+1=")
    assert pair.chosen_ids == [*ids(tok, "2"), tok.eos_token_id]
    assert pair.rejected_ids == [*ids(tok, "3"), tok.eos_token_id]


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": USER, "chosen": [{"role": "assistant", "content": "2"}],
         "rejected": [{"role": "assistant", "content": "3"}]},
        {"prompt": USER, "chosen": "2", "rejected": "3"},
        {"chosen": [*USER, {"role": "assistant", "content": "2"}],
         "rejected": [*USER, {"role": "assistant", "content": "3"}]},
    ],
)  # fmt: skip
def test_conversational_formats_agree(tiny, row):
    _, tok = tiny
    pair = encode_pair(row, tok, "d", 0)
    prompt = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert pair.prompt_ids == ids(tok, prompt)
    assert tok.decode(pair.chosen_ids) == "2<|im_end|>\n"
    assert tok.decode(pair.rejected_ids) == "3<|im_end|>\n"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": "a"}, "d: row 7 has no 'rejected' column"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "row 7 has no 'chosen' column (or it is"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "'chosen' must be text or a list"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' must be non-empty text"),
        ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
         "a text prompt needs text 'chosen' and 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "must be whole conversations"),
        ({"chosen": [*USER, {"role": "assistant", "content": "2"}],
          "rejected": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]},
         "must share every message but the last"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
         "column 'prompt' must be a non-empty list of {'role': str, 'content': str}"),
    ],
)  # fmt: skip
def test_bad_pairs_name_source_row_and_column(tiny, row, message):
    with pytest.raises(DataError, match="^d: row 7") as info:
        encode_pair(row, tiny[1], "d", 7)
    assert message in str(info.value)


def make_pairs(tok, count: int = 6):
    rows = [
        {"prompt": f"{a}+{a + 1}=", "chosen": str(2 * a + 1), "rejected": str(2 * a + 11) + "0" * a}
        for a in range(count)
    ]
    return [encode_pair(r, tok, "d", i) for i, r in enumerate(rows)]


def test_paired_forward_sums_response_tokens(tiny):
    model, tok = tiny
    pairs = make_pairs(tok)
    batch = dpo.make_batch(pairs, tok.pad_token_id)
    with torch.no_grad():
        out = dpo.forward(model.eval(), batch)
        for i, pair in enumerate(pairs):
            for response, got in (
                (pair.chosen_ids, out.chosen_P),
                (pair.rejected_ids, out.rejected_P),
            ):
                seq = torch.tensor([pair.prompt_ids + response])
                lp = token_logprobs(model, seq, torch.ones_like(seq))[0, len(pair.prompt_ids) :]
                assert got[i].item() == pytest.approx(lp.sum().item(), abs=1e-5)
    assert out.chosen_tokens_P.tolist() == [len(p.chosen_ids) for p in pairs]
    assert out.rejected_tokens_P.tolist() == [len(p.rejected_ids) for p in pairs]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_micro_batches_give_the_full_batch_update(tiny_path, loss_type):
    from posttrain.models.load import load_policy

    results = []
    for micro in (6, 2, 1):
        model, tok = load_policy(tiny_path, "float32", "cpu")
        pairs = make_pairs(tok)
        refs = dpo.sequence_logps(model, dpo.make_batch(pairs, tok.pad_token_id), 6)
        batch = dpo.make_batch(pairs, tok.pad_token_id, refs.chosen_P, refs.rejected_P)
        optim = OptimConfig(lr=1e-3, micro_batch_size=micro, max_grad_norm=None)
        learner = Learner(model, optim, 1)
        cfg = DPOParams(beta=0.5, loss_type=loss_type)
        metrics = learner.update(batch, partial(dpo.loss, cfg=cfg), dpo.forward)
        # Adam's first step is about lr * sign(grad): compare the accumulated gradients.
        results.append((metrics, [p.grad.clone() for p in model.parameters()]))
    (m0, p0), *rest = results
    for metrics, params in rest:
        assert metrics["loss"] == pytest.approx(m0["loss"], abs=1e-6)
        # No accuracy check: at the reference every margin is 0 up to rounding, and micro-
        # batches of other widths round differently, so the sign of a margin is noise here.
        assert metrics["dpo/logps_chosen"] == pytest.approx(m0["dpo/logps_chosen"], abs=1e-4)
        for a, b in zip(p0, params, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # at the reference, every margin is 0: loss log 2 (sigmoid), (1/(2 beta))^2 = 1 (ipo)
    assert m0["loss"] == pytest.approx(0.693147 if loss_type == "sigmoid" else 1.0, abs=1e-5)


CONFIG = """
run: {{name: dpo-test, output_dir: {out}, seed: 0}}
model: {{path: tiny://arithmetic}}
tracking: {{backend: jsonl}}
stages:
  - name: dpo
    algo: dpo
    data: {{source: builtin://arithmetic_pairs, split: train, limit: 64}}
    dpo: {dpo}
    train: {{lr: 1.0e-3, batch_size: 16, max_steps: 8, micro_batch_size: 8}}
    eval_pairs: {{source: builtin://arithmetic_pairs, split: test, limit: 32}}
"""


@pytest.mark.parametrize(
    "dpo_cfg",
    ["{beta: 0.1}", "{beta: 2.0, loss_type: simpo, reference: none, simpo_gamma: 0.5}"],
)
def test_dpo_stage_trains_every_parameter_and_logs_pair_metrics(tmp_path, tiny_path, dpo_cfg):
    path = tmp_path / "dpo.yaml"
    path.write_text(CONFIG.format(out=tmp_path / "run", dpo=dpo_cfg))
    summary = run_pipeline(load_config(path), path)
    before = AutoModelForCausalLM.from_pretrained(tiny_path)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "dpo" / "model")
    unchanged = [
        n for (n, a), b in zip(before.named_parameters(), after.parameters(), strict=True)
        if torch.equal(a, b)
    ]  # fmt: skip
    assert unchanged == []
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    assert first["step"] == 0 and last["step"] == 8
    assert summary["dpo"]["eval/pair_accuracy"] == last["eval/pair_accuracy"]
    assert {"train/dpo/accuracy", "train/dpo/logps_chosen", "train/loss"} <= set(lines[1])
    if "simpo" in dpo_cfg:
        assert "eval/reward_accuracy" not in last
    else:
        assert first["eval/reward_accuracy"] == 0.0  # policy == reference before training
        assert {"eval/reward_accuracy", "eval/reward_margin"} <= set(last)
        # an untrained model on 64 pairs: the training pairs are learned, not yet held-out ones
        assert lines[1]["train/loss"] == pytest.approx(0.693147, abs=1e-5)  # log 2 at the start
        assert last["train/loss"] < 0.68 and last["train/dpo/accuracy"] > 0.7
        assert "train/dpo/both_down_fraction" in lines[1]
