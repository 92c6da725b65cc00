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
from tests.small_models import random_lm


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
    model = random_lm()
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
        random_lm(),
        LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
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


def test_fused_head_equals_autograd_on_random_inputs():
    """`head_logprobs` against autograd through the same math, with chunks that do not divide N
    and a gradient that is zero at some positions (masked ones)."""
    from posttrain.head_logprobs import head_logprobs

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(11, 8, generator=gen, requires_grad=True)
    w = torch.randn(13, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 13, (11,), generator=gen)
    g = torch.rand(11, generator=gen) * (torch.arange(11) % 3 != 0)

    logits = h @ w.T
    want = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    (want * g).sum().backward()
    want_h, want_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None

    got = head_logprobs(h, w, targets, chunk=4)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    (got * g).sum().backward()
    torch.testing.assert_close(h.grad, want_h, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.grad, want_w, atol=1e-6, rtol=1e-5)

    # A frozen head (LoRA elsewhere): only the hidden states get a gradient.
    h.grad = None
    head_logprobs(h, w.detach(), targets, chunk=5).sum().backward()
    assert h.grad is not None


def test_a_lora_wrapped_head_takes_the_autograd_chunks(monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(logprobs, "CHUNK_TOKENS", 4)
    model = get_peft_model(
        random_lm(), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    )
    ids, mask = _batch()
    expected = _plain(model, ids, mask)
    (expected * mask).sum().backward()
    want = _grads(model)
    model.zero_grad()
    got = logprobs.token_logprobs(model, ids, mask)
    torch.testing.assert_close(got * mask, expected * mask, atol=1e-5, rtol=0)
    (got * mask).sum().backward()
    for g, w in zip(_grads(model), want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_left_padding_keeps_the_mask_and_rounded_widths_cut_back(monkeypatch):
    """A left-padded batch runs with its mask (equal to the plain path at the real tokens); a
    width rounded past the batch (as on CUDA, `CUDA_WIDTH_MULTIPLE`) is cut back to the input's."""
    model = random_lm()
    ids, mask = _batch()
    lengths = mask.sum(1)
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for row, n in enumerate(lengths.tolist()):
        left_ids[row, ids.shape[1] - n :] = ids[row, :n]
        left_mask[row, ids.shape[1] - n :] = 1
    with torch.no_grad():
        want = _plain(model, left_ids, left_mask) * left_mask
        got = logprobs.token_logprobs(model, left_ids, left_mask) * left_mask
        torch.testing.assert_close(got[:, 1:], want[:, 1:], atol=1e-5, rtol=0)

        monkeypatch.setattr(logprobs, "_round_width", lambda width, device: 16)
        rounded = logprobs.token_logprobs(model, ids, mask)
        assert rounded.shape == ids.shape  # 12 columns in, 16 computed, 12 out
        torch.testing.assert_close(
            rounded * mask, _plain(model, ids, mask) * mask, atol=1e-5, rtol=0
        )
