"""The PPO stage: critic shapes, advantages through `make_batch` against hand-derived values and
direct GAE, micro-batch equivalence, and real iterations on the tiny model.

Run: `pytest tests/test_ppo_stage.py`.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from posttrain.algorithms import ppo
from posttrain.algorithms.advantages import whiten
from posttrain.algorithms.gae import gae, kl_penalized_rewards
from posttrain.config import load_config
from posttrain.config.schema import OptimConfig, PPOParams
from posttrain.learner import Learner
from posttrain.logprobs import token_logprobs
from posttrain.loop import run_loop
from posttrain.models.critic import SeparateCritic, ValueHead, build_critic
from posttrain.pipeline import run_pipeline
from posttrain.stages import ppo as ppo_stage
from posttrain.stages.context import StageContext
from posttrain.tracking import JsonlTracker
from rollouts import Group, Sample

SCORES = [1.0, 0.0, 0.5, -1.0]


def make_groups(tok, n: int = 2) -> list[Group]:
    """Two prompts x n samples with completions of different lengths (EOS-ended or not)."""
    eos = tok.eos_token_id
    texts = [("12+34=", ["46", "4"]), ("7+8=", ["15", "151"])]
    groups = []
    for prompt, completions in texts:
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        samples = []
        for j, text in enumerate(completions[:n]):
            c_ids = tok(text, add_special_tokens=False).input_ids + ([eos] if j == 0 else [])
            samples.append(Sample(prompt, text, p_ids, c_ids, [0.0] * len(c_ids), "stop", 0))
        groups.append(Group(prompt, samples))
    return groups


def perturbed(model, scale: float = 0.05):
    """A reference that differs from the policy, so the KL penalty is not zero."""
    torch.manual_seed(1)
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn_like(p))
    return ref


def test_value_head_reads_the_previous_position(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    head = build_critic("head", model, "", torch.float32, tok.pad_token_id)
    assert isinstance(head, ValueHead)
    ids = torch.tensor([tok("12+34=46", add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        values = head(out.hidden_states[-1])
    assert values.shape == ids.shape
    assert values[0, 0].item() == 0.0  # position 0 predicts nothing
    expected = head.linear(out.hidden_states[-1][0, 2]).item()
    assert values[0, 3].item() == pytest.approx(expected, abs=1e-6)


def test_separate_critic_matches_the_sequence_classifier_on_prefixes(tiny, tiny_path):
    model, tok = tiny
    torch.manual_seed(0)
    critic = build_critic("separate", model, tiny_path, torch.float32, tok.pad_token_id)
    assert isinstance(critic, SeparateCritic)
    ids = torch.tensor([tok("12+34=46", add_special_tokens=False).input_ids])
    with torch.no_grad():
        values = critic(ids, torch.ones_like(ids))
        assert values.shape == ids.shape and values[0, 0].item() == 0.0
        # V at position t is the classifier's score of the prefix x_<t (causal attention).
        for t in (1, 4, ids.shape[1] - 1):
            pooled = critic.model(input_ids=ids[:, :t]).logits[0, 0].item()
            assert values[0, t].item() == pytest.approx(pooled, abs=1e-5)


def test_undiscounted_advantages_are_score_minus_future_kl_minus_value(tiny):
    """gamma = lambda = 1, no whitening: A_t = score - beta * sum_{k>=t} kl_k - V_t."""
    model, tok = tiny
    torch.manual_seed(0)
    head = ValueHead(model.config.hidden_size)
    reference = perturbed(model)
    cfg = PPOParams(gamma=1.0, lam=1.0, kl_coef=0.3, whiten_advantages=False)
    groups = make_groups(tok)
    out = ppo.make_batch(groups, SCORES, cfg, tok.pad_token_id, model, head, reference, 3)
    b = out.batch
    assert b.num_sequences == 4 and b.num_tokens == int(b.loss_mask_BT.sum()) == 3 + 1 + 3 + 3
    with torch.no_grad():
        lp = token_logprobs(model.eval(), b.input_ids_BT, b.attention_mask_BT)
        ref = token_logprobs(reference, b.input_ids_BT, b.attention_mask_BT)
    samples = [s for g in groups for s in g.samples]
    for row, (s, score) in enumerate(zip(samples, SCORES, strict=True)):
        start, end = len(s.prompt_ids), len(s.prompt_ids) + len(s.completion_ids)
        kl = (lp[row] - ref[row])[start:end]
        values = b.old_values_BT[row, start:end]
        future_kl = kl.flip(0).cumsum(0).flip(0)
        torch.testing.assert_close(
            b.advantages_BT[row, start:end], score - 0.3 * future_kl - values, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            b.returns_BT[row, start:end], score - 0.3 * future_kl, atol=1e-5, rtol=0
        )
        assert b.advantages_BT[row, :start].abs().sum() == 0
        assert b.advantages_BT[row, end:].abs().sum() == 0
    assert out.metrics["ppo/kl_ref"] == pytest.approx(
        ((lp - ref) * b.loss_mask_BT).sum(1).mean().item(), abs=1e-5
    )


def test_discounted_whitened_advantages_match_direct_gae(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    head = ValueHead(model.config.hidden_size)
    reference = perturbed(model)
    cfg = PPOParams(gamma=0.9, lam=0.8, kl_coef=0.1, kl_estimator="k3")
    b = ppo.make_batch(make_groups(tok), SCORES, cfg, tok.pad_token_id, model, head, reference, 4)
    b = b.batch
    with torch.no_grad():
        out = model.eval()(
            input_ids=b.input_ids_BT, attention_mask=b.attention_mask_BT, output_hidden_states=True
        )
        values = head(out.hidden_states[-1])
        lp = token_logprobs(model, b.input_ids_BT, b.attention_mask_BT)
        ref = token_logprobs(reference, b.input_ids_BT, b.attention_mask_BT)
    mask = b.loss_mask_BT
    r = ref - lp
    kl = (r.exp() - r - 1) * mask
    rewards = kl_penalized_rewards(torch.tensor(SCORES), kl, mask, 0.1)
    expected = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(
        b.advantages_BT, whiten(expected.advantages_BT, mask), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(b.returns_BT, expected.returns_BT, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.old_values_BT, values, atol=1e-6, rtol=0)


def test_minibatches_partition_the_rows(tiny):
    model, tok = tiny
    head = ValueHead(model.config.hidden_size)
    cfg = PPOParams(kl_coef=0.0)
    b = ppo.make_batch(make_groups(tok), SCORES, cfg, tok.pad_token_id, model, head, None, 4).batch
    parts = ppo.minibatches(b, 3, torch.Generator().manual_seed(0))
    assert [p.num_sequences for p in parts] == [2, 1, 1]
    assert sum(p.num_tokens for p in parts) == b.num_tokens
    seen = sorted(tuple(r.tolist()) for p in parts for r in p.input_ids_BT)
    assert seen == sorted(tuple(r.tolist()) for r in b.input_ids_BT)
    for p in parts:
        assert p.num_tokens == int(p.loss_mask_BT.sum())


@pytest.mark.parametrize("kind", ["head", "separate"])
def test_micro_batches_give_the_full_batch_gradient(tiny_path, kind):
    from posttrain.models.load import load_policy

    results = []
    for micro in (4, 3, 1):
        model, tok = load_policy(tiny_path, "float32", "cpu")
        torch.manual_seed(0)
        critic = build_critic(kind, model, tiny_path, torch.float32, tok.pad_token_id)
        cfg = PPOParams(kl_coef=0.0, vf_coef=0.5)
        b = ppo.make_batch(make_groups(tok), SCORES, cfg, tok.pad_token_id, model, critic, None, 4)
        # a moved policy and critic, so ratios and value clipping are not trivial
        with torch.no_grad():
            for p in [*model.parameters(), *critic.parameters()]:
                p.add_(0.03 * torch.randn_like(p))
        algorithm = ppo.PPO(cfg, tok.pad_token_id, model, critic, None, micro)
        groups = [
            {"params": list(model.parameters()), "lr": 1e-3},
            {"params": list(critic.parameters()), "lr": 1e-2},
        ]
        optim = OptimConfig(lr=1e-3, micro_batch_size=micro, max_grad_norm=None)
        learner = Learner(model, optim, 1, param_groups=groups)
        metrics = learner.update(b.batch, algorithm.loss, algorithm.forward)
        grads = [p.grad.clone() for p in [*model.parameters(), *critic.parameters()]]
        results.append((metrics, grads))
    (m0, g0), *rest = results
    for metrics, grads in rest:
        for key in ("loss", "ppo/policy_loss", "ppo/value_loss", "ppo/clip_fraction"):
            assert metrics[key] == pytest.approx(m0[key], abs=1e-5), key
        for a, b in zip(g0, grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert 0.0 < m0["ppo/clip_fraction"] < 1.0  # the perturbation moved some ratios past 1.2


REWARD_FILE = """
def digits(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / 4 for c in completions]
"""

CONFIG = """
run: {{name: ppo-test, output_dir: {out}, seed: 0}}
model: {{path: tiny://arithmetic}}
tracking: {{backend: jsonl, samples_every: 1}}
stages:
  - name: ppo
    algo: ppo
    iterations: {iterations}
    data: {{source: builtin://arithmetic, split: train, limit: 64}}
    rollout: {{engine: hf, n: 2, max_new_tokens: 4}}
    rewards: [{{name: exact_answer}}, {{name: ./r.py:digits, weight: 0.5}}]
    ppo: {{prompts_per_iteration: 4, ppo_epochs: 2, minibatches: 2, kl_coef: 0.1}}
    critic: {critic}
    train: {{lr: 1.0e-3, micro_batch_size: 3}}
    eval:
      data: {{source: builtin://arithmetic, split: test, limit: 8}}
      max_new_tokens: 4
"""

STEP_METRICS = [
    "train/loss",
    "train/ppo/policy_loss",
    "train/ppo/value_loss",
    "train/ppo/clip_fraction",
    "train/ppo/value_clip_fraction",
    "train/ppo/approx_kl",
    "train/ppo/value_pred_mean",
    "ppo/kl_ref",
    "ppo/score_mean",
    "ppo/value_mean",
    "ppo/explained_variance",
    "train/reward/total",
    "eval/accuracy",
]


def write_config(tmp_path, critic: str, iterations: int = 1):
    (tmp_path / "r.py").write_text(REWARD_FILE)
    path = tmp_path / "ppo.yaml"
    path.write_text(CONFIG.format(out=tmp_path / "run", critic=critic, iterations=iterations))
    return path


@pytest.mark.parametrize("critic", ["{kind: head, lr: 1.0e-2}", "{kind: separate}"])
def test_one_iteration_changes_every_policy_and_critic_parameter(tmp_path, tiny_path, critic):
    path = write_config(tmp_path, critic)
    cfg = load_config(path)
    stage = cfg.stages[0]
    (tmp_path / "run").mkdir()
    tracker = JsonlTracker(tmp_path / "run" / "metrics.jsonl", "ppo")
    ctx = StageContext(cfg, 0, cfg.model.path, tmp_path / "run" / "ppo", tmp_path, tracker)
    built = ppo_stage.build(stage, ctx)
    policy, critic_module = built.parts.learner.model, built.critic
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    critic_before = {n: p.detach().clone() for n, p in critic_module.named_parameters()}
    assert built.parts.learner.optimizer.param_groups[1]["lr"] == (
        1e-2 if "head" in critic else 1e-3
    )
    run_loop(built.parts)
    tracker.finish()
    unchanged = [n for n, p in policy.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    unchanged = [n for n, p in critic_module.named_parameters() if torch.equal(p, critic_before[n])]
    assert unchanged == []
    (line,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    missing = [k for k in STEP_METRICS if k not in line]
    assert missing == []
    assert line["ppo/kl_ref"] == pytest.approx(0.0, abs=1e-5)  # policy == reference when sampled
    # 2 epochs x 2 minibatches: the last step's policy has moved from the sampling policy
    assert line["train/ppo/approx_kl"] > 0


def test_stage_saves_a_plain_causal_lm_and_the_critic(tmp_path, tiny_path):
    path = write_config(tmp_path, "{kind: head}", iterations=2)
    summary = run_pipeline(load_config(path), path)
    assert 0.0 <= summary["ppo"]["eval/accuracy"] <= 1.0
    out = tmp_path / "run" / "ppo"
    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    initial = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert saved.config.architectures == initial.config.architectures == ["Qwen2ForCausalLM"]
    assert saved.state_dict().keys() == initial.state_dict().keys()
    head = ValueHead.load(out / "critic")
    assert head.linear.weight.shape == (1, initial.config.hidden_size)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    # the second iteration samples from a moved policy (k1 estimates may be negative)
    assert abs(lines[1]["ppo/kl_ref"]) > 1e-4
    samples = [
        json.loads(x) for x in (tmp_path / "run" / "samples-ppo.jsonl").read_text().splitlines()
    ]
    assert {"prompt", "completion", "digits", "total", "advantage"} <= set(samples[0])


def test_separate_critic_saves_a_loadable_sequence_classifier(tmp_path):
    path = write_config(tmp_path, "{kind: separate}")
    run_pipeline(load_config(path), path)
    critic = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "ppo" / "critic")
    assert critic.config.num_labels == 1 and critic.config.pad_token_id is not None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("{kind: head, path: x}", "critic.path initialises a separate critic"),
        ("{kind: value}", "critic.kind"),
    ],
)
def test_bad_critic_config(tmp_path, override, message):
    from posttrain.config.load import ConfigError

    path = write_config(tmp_path, override)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_too_many_minibatches_is_a_config_error(tmp_path):
    from posttrain.config.load import ConfigError

    path = write_config(tmp_path, "{kind: head}")
    with pytest.raises(ConfigError, match="ppo.minibatches=9 exceeds the 8 samples"):
        load_config(path, ["stages.0.ppo.minibatches=9"])


def test_resume_from_a_middle_checkpoint_matches_the_uninterrupted_run(tmp_path, tiny_path):
    """Policy, critic, optimizer, sampler and RNG (minibatch shuffles) all come back."""
    from safetensors.torch import load_file

    from posttrain.resume import status

    (tmp_path / "r.py").write_text(REWARD_FILE)
    text = CONFIG.replace("seed: 0}}", "seed: 0, checkpoint_every: 1, keep_checkpoints: 5}}")
    runs = {}
    for name in ("full", "part"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text.format(out=tmp_path / name, critic="{kind: head}", iterations=3))
        runs[name] = path
        run_pipeline(load_config(path), path)
    stage = tmp_path / "part" / "ppo"
    for folder in (stage / "checkpoint-3", stage / "model", stage / "critic"):
        shutil.rmtree(folder)
    (stage / "DONE").unlink()
    assert status(tmp_path / "part")[0]["progress"] == "2/3"
    run_pipeline(load_config(runs["part"]), runs["part"])
    for file in ("model/model.safetensors", "critic/value_head.safetensors"):
        full, again = load_file(tmp_path / "full" / "ppo" / file), load_file(stage / file)
        assert full.keys() == again.keys()
        assert all(torch.equal(full[k], again[k]) for k in full), file

    def lines(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "sync/"))} for r in rows]

    assert lines(tmp_path / "full") == lines(tmp_path / "part")


def test_lora_policy_uses_the_disabled_adapter_as_reference(tmp_path):
    path = write_config(tmp_path, "{kind: head}", iterations=2)
    path.write_text(
        path.read_text().replace("tiny://arithmetic}}", "tiny://arithmetic, lora: {r: 4}}")
    )
    run_pipeline(load_config(path), path)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["ppo/kl_ref"] == 0.0  # a new adapter (B = 0) is the reference itself
    assert abs(lines[1]["ppo/kl_ref"]) > 1e-4  # the adapter was trained, the reference was not
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "ppo" / "model")
    assert merged.config.architectures == ["Qwen2ForCausalLM"]
