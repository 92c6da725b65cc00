"""`token_logprobs`: the chunked LM-head path equals the plain full-logits path.

In float32 the two agree to rounding, values and gradients, with chunks smaller than a row,
with right padding (trimmed columns come back as zeros), and with a LoRA adapter; a model the
chunked path does not know (GPT-2) takes the plain path.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from posttrain import logprobs
from posttrain.batch import pad_right

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
)


def _model(kind="qwen2"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **SMALL))


def _plain(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logprobs.logprobs_from_logits(logits, ids)


def _batch():
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 97, (n,), generator=gen).tolist() for n in (9, 4, 6)]
    ids, mask = pad_right(rows, 0)
    extra = torch.zeros((3, 3), dtype=torch.long)  # columns of padding in every row
    return torch.cat([ids, extra], 1), torch.cat([mask, extra], 1)


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_chunked_equals_plain_values_and_gradients(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_TOKENS", 5)  # several chunks, cutting across rows
    model = _model()
    ids, mask = _batch()
    weights = torch.rand(ids.shape)

    expected = _plain(model, ids, mask)
    (expected * mask * weights).sum().backward()
    want = _grads(model)
    model.zero_grad()

    got = logprobs.token_logprobs(model, ids, mask)
    assert got.shape == ids.shape
    assert torch.all(got[:, -3:] == 0)  # the trimmed columns
    torch.testing.assert_close(got * mask, expected * mask, atol=1e-5, rtol=0)
    (got * mask * weights).sum().backward()
    for g, w in zip(_grads(model), want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_chunked_path_applies_lora(monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(logprobs, "CHUNK_TOKENS", 7)
    model = get_peft_model(
        _model(), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(
            logprobs.token_logprobs(model, ids, mask) * mask, _plain(model, ids, mask) * mask,
            atol=1e-5, rtol=0,
        )  # fmt: skip
        with model.disable_adapter():
            base = logprobs.token_logprobs(model, ids, mask)
        assert (base - logprobs.token_logprobs(model, ids, mask)).abs().max() > 1e-4


def test_other_models_take_the_plain_path():
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=97)
    ).eval()
    ids, mask = _batch()
    with torch.no_grad():
        got = logprobs.token_logprobs(gpt2, ids, mask)
        torch.testing.assert_close(got * mask, _plain(gpt2, ids, mask) * mask, atol=1e-6, rtol=0)
