"""The reward-model stage: the Bradley-Terry loss by hand, the scored texts, micro-batching, and
a real run whose output the `reward_model` scorer reads with the stage's own numbers.

Run: `pytest tests/test_rm_stage.py`.
"""

from __future__ import annotations

import json
import math
import shutil
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from posttrain.algorithms import rm
from posttrain.config import load_config
from posttrain.config.schema import OptimConfig, RMParams
from posttrain.data.arithmetic import arithmetic_pair_rows
from posttrain.data.load import DataError
from posttrain.learner import Learner
from posttrain.pipeline import run_pipeline
from posttrain.stages.rm import load_reward_model
from rewards import resolve_reward
from rewards.reward_model import _join as scorer_text

USER = [{"role": "user", "content": "1+1="}]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# r_chosen = [1.0, 0.5], r_rejected = [0.0, 1.5]: differences 1 and -1.
@pytest.mark.parametrize(
    ("margin", "center", "expected"),
    [
        (None, 0.0, (softplus(-1.0) + softplus(1.0)) / 2),  # 0.813262
        ([0.5, 0.0], 0.0, (softplus(-0.5) + softplus(1.0)) / 2),  # margin shifts pair 1 only
        (None, 0.1, (softplus(-1.0) + softplus(1.0)) / 2 + 0.1 * (1.0**2 + 2.0**2) / 2),
    ],
)
def test_bradley_terry_loss_by_hand(margin, center, expected):
    chosen = torch.tensor([1.0, 0.5], requires_grad=True)
    rejected = torch.tensor([0.0, 1.5])
    out = rm.bradley_terry_loss(
        chosen,
        rejected,
        None if margin is None else torch.tensor(margin),
        center_coefficient=center,
    )
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.accuracy.item() == 0.5 and out.margin.item() == 0.0
    out.loss.backward()
    # d/dr_c of -log sigmoid(d) / 2 is -sigmoid(-d) / 2 (plus the centring term's 2c(r_c+r_r)/2)
    m = margin or [0.0, 0.0]
    grads = [-1 / (1 + math.exp(d - mi)) / 2 for d, mi in zip([1.0, -1.0], m, strict=True)]
    grads = [g + center * (c + r) for g, c, r in zip(grads, [1.0, 0.5], [0.0, 1.5], strict=True)]
    assert chosen.grad.tolist() == pytest.approx(grads, abs=1e-6)


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"one shape \[P\]"):
        rm.bradley_terry_loss(torch.zeros(2), torch.zeros(3))


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "12+34=", "chosen": "46", "rejected": "47"},
        {"prompt": USER, "chosen": "2", "rejected": "3"},
        {"prompt": USER, "chosen": [{"role": "assistant", "content": "2"}],
         "rejected": [{"role": "assistant", "content": "3"}]},
        {"chosen": [*USER, {"role": "assistant", "content": "2"}],
         "rejected": [*USER, {"role": "assistant", "content": "3"}]},
    ],
)  # fmt: skip
def test_pairs_encode_exactly_the_text_the_scorer_scores(tiny, row):
    _, tok = tiny
    pair = rm.encode_rm_pair(row, tok, "d", 0)
    prompt = row.get("prompt", row["chosen"][:-1])
    for key, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        reply = row[key] if "prompt" in row else row[key][-1:]
        assert ids == tok(scorer_text(tok, prompt, reply), add_special_tokens=False).input_ids
    if isinstance(row.get("prompt"), str):  # plain text: no EOS appended (unlike SFT and DPO)
        assert tok.decode(pair.chosen_ids) == "12+34=46"
        assert pair.chosen_ids[-1] != tok.eos_token_id


@pytest.mark.parametrize(
    ("row", "column", "message"),
    [
        ({"prompt": "p", "chosen": "a"}, None, "d: row 3 has no 'rejected' column"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "m", "column 'm' (rm.margin_column)"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "m": "x"}, "m", "must be a number"),
    ],
)
def test_bad_rows_name_source_row_and_column(tiny, row, column, message):
    with pytest.raises(DataError, match="^d: row 3") as info:
        rm.encode_rm_pair(row, tiny[1], "d", 3, column)
    assert message in str(info.value)


def make_pairs(tok, count: int = 6) -> list[rm.RMPair]:
    rows = arithmetic_pair_rows("train")[:count]
    return [rm.encode_rm_pair({**r, "m": 0.1 * i}, tok, "d", i, "m") for i, r in enumerate(rows)]


def test_micro_batches_give_the_full_batch_update(tiny_path):
    results = []
    for micro in (6, 4, 1):
        torch.manual_seed(0)
        model, tok = load_reward_model(tiny_path, "float32", "cpu", 0)
        batch = rm.make_batch(make_pairs(tok), tok.pad_token_id)
        learner = Learner(model, OptimConfig(lr=1e-3, micro_batch_size=micro), 1)
        cfg = RMParams(margin_column="m", center_rewards_coefficient=0.01)
        metrics = learner.update(batch, partial(rm.loss, cfg=cfg), rm.forward)
        results.append((metrics, [p.grad.clone() for p in model.parameters()]))
    (m0, g0), *rest = results
    for metrics, grads in rest:
        for key in ("loss", "rm/accuracy", "rm/margin", "rm/chosen_reward", "grad_norm"):
            assert metrics[key] == pytest.approx(m0[key], abs=1e-5), key
        for a, b in zip(g0, grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_padding_does_not_change_a_reward(tiny_path):
    torch.manual_seed(0)
    model, tok = load_reward_model(tiny_path, "float32", "cpu", 0)
    pairs = make_pairs(tok, 4)
    together = rm.pair_rewards(model, rm.make_batch(pairs, tok.pad_token_id), 4)
    alone = [rm.pair_rewards(model, rm.make_batch([p], tok.pad_token_id), 1) for p in pairs]
    torch.testing.assert_close(together.chosen_P, torch.cat([a.chosen_P for a in alone]))
    torch.testing.assert_close(together.rejected_P, torch.cat([a.rejected_P for a in alone]))


CONFIG = """
run: {{name: rm-test, output_dir: {out}, seed: 0}}
model: {{path: tiny://arithmetic}}
tracking: {{backend: jsonl}}
stages:
  - name: rm
    algo: rm
    data: {{source: builtin://arithmetic_pairs, split: train, limit: 64}}
    train: {{lr: 1.0e-3, batch_size: 16, max_steps: 6, micro_batch_size: 16}}
    eval_pairs: {{source: builtin://arithmetic_pairs, split: test, limit: 32}}
    eval_every: 3
  - name: after
    algo: sft
    data: {{source: builtin://arithmetic, split: train, limit: 8}}
    train: {{lr: 0.0, batch_size: 8, max_steps: 1}}
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("rm")
    path = root / "rm.yaml"
    path.write_text(CONFIG.format(out=root / "run"))
    return root / "run", run_pipeline(load_config(path), path), tiny_path


def test_rm_stage_trains_every_parameter_and_logs_pair_accuracy(finished_run):
    run_dir, summary, tiny_path = finished_run
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["stage"] == "rm"]
    assert [x["step"] for x in steps] == [0, 1, 2, 3, 4, 5, 6]
    assert [x["step"] for x in steps if "eval/pair_accuracy" in x] == [0, 3, 6]
    assert {"train/loss", "train/rm/accuracy", "train/rm/margin"} <= set(steps[1])
    assert summary["rm"]["eval/pair_accuracy"] == steps[-1]["eval/pair_accuracy"]
    assert steps[-1]["train/loss"] < steps[1]["train/loss"]
    before = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1)
    after = AutoModelForSequenceClassification.from_pretrained(run_dir / "rm" / "model")
    assert after.config.num_labels == 1
    assert after.config.pad_token_id is not None
    body = dict(before.named_parameters())
    unchanged = [n for n, p in after.named_parameters() if n in body and torch.equal(p, body[n])]
    assert unchanged == []


def test_scorer_reads_the_rm_with_the_stages_numbers(finished_run):
    run_dir, summary, _ = finished_run
    rows = arithmetic_pair_rows("test")[:32]
    fn = resolve_reward("reward_model", args={"path": str(run_dir / "rm" / "model")})
    prompts = [r["prompt"] for r in rows]
    chosen = fn(prompts=prompts, completions=[r["chosen"] for r in rows])
    rejected = fn(prompts=prompts, completions=[r["rejected"] for r in rows])
    accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows)
    final = summary["rm"]
    assert accuracy == final["eval/pair_accuracy"]
    assert sum(chosen) / len(rows) == pytest.approx(final["eval/chosen_reward"], abs=1e-5)
    assert sum(rejected) / len(rows) == pytest.approx(final["eval/rejected_reward"], abs=1e-5)


def test_the_stage_after_an_rm_stage_gets_the_policy(finished_run):
    """The sft stage after the rm stage starts from the pipeline's model (lr 0: unchanged)."""
    run_dir, _, tiny_path = finished_run
    initial = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
    after = AutoModelForCausalLM.from_pretrained(run_dir / "after" / "model")
    assert after.config.architectures == ["Qwen2ForCausalLM"]
    changed = [n for n, p in after.state_dict().items() if not torch.equal(p, initial[n])]
    assert changed == []


def test_resume_from_a_middle_checkpoint_matches_the_uninterrupted_run(tmp_path, tiny_path):
    from safetensors.torch import load_file

    from posttrain.resume import status

    text = CONFIG.replace("seed: 0}}", "seed: 0, checkpoint_every: 2, keep_checkpoints: 5}}")
    text = text[: text.index("  - name: after")]  # the rm stage alone
    paths = {}
    for name in ("full", "part"):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(text.format(out=tmp_path / name))
        run_pipeline(load_config(paths[name]), paths[name])
    stage = tmp_path / "part" / "rm"
    for folder in (stage / "checkpoint-6", stage / "model"):
        shutil.rmtree(folder)
    (stage / "DONE").unlink()
    assert status(tmp_path / "part")[0]["progress"] == "4/6"
    run_pipeline(load_config(paths["part"]), paths["part"])
    full = load_file(tmp_path / "full" / "rm" / "model" / "model.safetensors")
    again = load_file(stage / "model" / "model.safetensors")
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)

    def lines(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    assert lines(tmp_path / "full") == lines(tmp_path / "part")
