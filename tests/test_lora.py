"""LoRA: the reference is the base with the adapter disabled, merged export, saving, loading.

Run: `pytest tests/test_lora.py`.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import load_config
from posttrain.config.schema import LoraSpec
from posttrain.logprobs import token_logprobs
from posttrain.models.load import load_policy
from posttrain.models.lora import is_peft, reference_mode, save_policy
from posttrain.pipeline import run_pipeline
from rollouts.weights import export_state_dict


def ids_and_mask(tokenizer):
    enc = tokenizer(["12+34=46", "7+8=15"], padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def perturbed_lora(tiny_path, spec=None):
    model, tokenizer = load_policy(tiny_path, "float32", "cpu", lora=spec or LoraSpec(r=4))
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero: make the adapter change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval(), tokenizer


def logprobs(model, tokenizer):
    with torch.no_grad():
        return token_logprobs(model, *ids_and_mask(tokenizer))


def test_only_the_adapter_trains(tiny_path):
    model, _ = perturbed_lora(tiny_path)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: every attention and MLP projection of the 4 layers, not the output head
    assert len(trainable) == 4 * 7 * 2


def test_reference_mode_is_exactly_the_base_model(tiny_path):
    model, tokenizer = perturbed_lora(tiny_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    with reference_mode(model):
        reference = logprobs(model, tokenizer)
    assert torch.equal(reference, logprobs(base, tokenizer))
    assert (logprobs(model, tokenizer) - reference).abs().max() > 1e-2  # the adapter is on again


def test_reference_mode_without_lora_is_the_model_itself(tiny):
    model, tokenizer = tiny
    with reference_mode(model):
        assert torch.equal(logprobs(model.eval(), tokenizer), logprobs(model, tokenizer))


def test_merged_export_has_base_names_and_the_adapted_outputs(tiny_path):
    model, tokenizer = perturbed_lora(tiny_path)
    before = logprobs(model, tokenizer)
    state = export_state_dict(model)
    plain = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state)
    torch.testing.assert_close(logprobs(plain, tokenizer), before, atol=1e-5, rtol=0)
    torch.testing.assert_close(logprobs(model, tokenizer), before, atol=1e-6, rtol=0)  # unmerged


@pytest.mark.parametrize("merge", [True, False])
def test_save_and_load_a_stage_output(tiny_path, tmp_path, merge):
    spec = LoraSpec(r=4, merge=merge)
    model, tokenizer = perturbed_lora(tiny_path, spec)
    expected = logprobs(model, tokenizer)
    save_policy(model, tokenizer, tmp_path / "model", spec)
    saved = sorted(p.name for p in (tmp_path / "model").iterdir())
    if merge:
        assert "config.json" in saved and "adapter_config.json" not in saved
        assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    else:
        assert "adapter_config.json" in saved and "config.json" not in saved
    loaded, _ = load_policy(str(tmp_path / "model"), "float32", "cpu")
    assert is_peft(loaded) is (not merge)
    if not merge:  # the next stage keeps training the same adapter
        assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
    torch.testing.assert_close(logprobs(loaded.eval(), tokenizer), expected, atol=1e-5, rtol=0)


CONFIG = """
run: {{name: lora, output_dir: {out}, seed: 0}}
model: {{path: tiny://arithmetic, lora: {{r: 8, alpha: 16, merge: {merge}}}}}
tracking: {{backend: jsonl}}
stages:
  - name: sft
    algo: sft
    data: {{source: builtin://arithmetic, split: train, limit: 128}}
    train: {{lr: 1.0e-3, batch_size: 16, max_steps: 4}}
  - name: dpo
    algo: dpo
    data: {{source: builtin://arithmetic_pairs, split: train, limit: 32}}
    train: {{lr: 1.0e-3, batch_size: 8, max_steps: 3}}
    eval_pairs: {{source: builtin://arithmetic_pairs, split: test, limit: 16}}
"""


@pytest.mark.parametrize("merge", ["true", "false"])
def test_lora_pipeline_sft_then_dpo(tmp_path, tiny_path, merge):
    path = tmp_path / "lora.yaml"
    path.write_text(CONFIG.format(out=tmp_path / "run", merge=merge))
    run_pipeline(load_config(path), path)
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    dpo_start = next(x for x in lines if x["stage"] == "dpo" and x["step"] == 0)
    if merge == "true":
        # the DPO stage adds a new adapter to the merged SFT output, its reference (adapter
        # disabled): implicit rewards start at 0
        assert dpo_start["eval/reward_accuracy"] == 0.0
    else:
        # one adapter trained through both stages; the reference is the original base
        assert dpo_start["eval/reward_margin"] != 0.0
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    final, _ = load_policy(str(run / "dpo" / "model"), "float32", "cpu")
    final = final.merge_and_unload() if is_peft(final) else final
    changed = [
        n for (n, a), b in zip(base.named_parameters(), final.parameters(), strict=True)
        if not torch.equal(a, b)
    ]  # fmt: skip
    assert any("q_proj" in n for n in changed)
    assert not any("embed_tokens" in n or "norm" in n for n in changed)  # LoRA left them alone


RM_CONFIG = """
run: {{name: lora-rm, output_dir: {out}, seed: 0}}
model: {{path: tiny://arithmetic, lora: {{r: 4}}}}
tracking: {{backend: jsonl}}
stages:
  - name: rm
    algo: rm
    data: {{source: builtin://arithmetic_pairs, split: train, limit: 32}}
    train: {{lr: 1.0e-3, batch_size: 8, max_steps: 3}}
"""


def test_lora_reward_model_trains_adapter_and_head_and_saves_a_plain_scorer(tmp_path, tiny_path):
    from posttrain.stages.rm import load_reward_model
    from rewards import resolve_reward

    model, _ = load_reward_model(tiny_path, "float32", "cpu", 0, LoraSpec(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    path = tmp_path / "rm.yaml"
    path.write_text(RM_CONFIG.format(out=tmp_path / "run"))
    run_pipeline(load_config(path), path)
    saved = tmp_path / "run" / "rm" / "model"
    assert (saved / "config.json").is_file() and not (saved / "adapter_config.json").exists()
    scores = resolve_reward("reward_model", args={"path": str(saved)})(
        prompts=["1+1=", "1+1="], completions=["2", "3"]
    )
    assert len(scores) == 2 and scores[0] != scores[1]
