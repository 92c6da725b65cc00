"""The Triton decode kernels (`rollouts/decode_kernels.py`) against torch references, on GPU:
attention over the written, valid cache slots, and the draw's distribution, logprobs, greedy
choice and seeding. End to end (the static decoder's steps against the transformers forward,
which run these kernels on CUDA) is `tests/test_static_decode.py::test_static_decode_cuda_bf16`.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda_and_triton():
    from rollouts import decode_kernels

    if not torch.cuda.is_available() or not decode_kernels.load(torch.device("cuda")):
        pytest.skip("needs CUDA and Triton")


def _rotate(x, cos, sin):
    """transformers' rotary embedding in float32: `x` `[B, n, D]`, `cos`/`sin` `[B, D]`."""
    half = x.shape[-1] // 2
    x, cos, sin = x.float(), cos.float()[:, None], sin.float()[:, None]
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _reference_step(q, k_new, v_new, cos, sin, keys, values, valid, slot, scale):
    """The step in float32 torch code: rotate, write the new key/value at `slot` of copies of
    the cache, softmax attention of each query head over its KV head's slots `0..slot` that
    `valid` (with `slot` set) marks. Returns (output `[B, H, D]`, keys, values)."""
    keys, values, valid = keys.clone(), values.clone(), valid.clone()
    keys[:, :, slot] = _rotate(k_new, cos, sin).to(keys.dtype)
    values[:, :, slot] = v_new
    valid[:, slot] = True
    G = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(G, 1)
    v = values.float().repeat_interleave(G, 1)
    q = _rotate(q, cos, sin).to(q.dtype).float()[:, :, None]
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, H, 1, S]
    valid[:, slot + 1 :] = False
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, -1) @ v)[:, :, 0], keys, values


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(14, 2, 64), (4, 2, 16), (32, 8, 128), (16, 2, 256), (64, 1, 128)],
)
def test_attention_step_equals_rotate_write_and_softmax_attention(heads, kv_heads, head_dim):
    """Queries and the new key/value as views of one projection output (as the decoder passes
    them); left padding and holes in `valid`, slots across block edges; the cache gets the
    rotated key and the value at the slot and nothing else; slots past it are never read."""
    from rollouts.decode_kernels import decode_attention

    gen = torch.Generator("cuda").manual_seed(0)
    B, S, H, K, D = 6, 200, heads, kv_heads, head_dim
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    qkv = torch.randn(B, (H + 2 * K) * D, **kw)
    q, k_new, v_new = (t.view(B, -1, D) for t in qkv.split([H * D, K * D, K * D], -1))
    angle = torch.rand(B, D // 2, device="cuda", generator=gen) * 6
    cos, sin = (torch.cat([f(angle)] * 2, -1).bfloat16() for f in (torch.cos, torch.sin))
    keys, values = torch.randn(B, K, S, D, **kw), torch.randn(B, K, S, D, **kw)
    valid = torch.ones(B, S, dtype=torch.bool, device="cuda")
    for row, pad in enumerate([0, 3, 64, 65, 130, 0]):  # left padding, across block edges
        valid[row, :pad] = False
    valid[5, 100:140] = False  # a hole: slots never written for this row
    for slot in [0, 130, 131, 150, 191]:
        want, want_keys, want_values = _reference_step(
            q, k_new, v_new, cos, sin, keys, values, valid, slot, 0.125
        )
        got_keys, got_values, got_valid = keys.clone(), values.clone(), valid.clone()
        got_valid[:, slot] = True  # the decoder marks the step's slot before its layers
        at = torch.tensor([slot], device="cuda")
        out = decode_attention(q, k_new, v_new, cos, sin, got_keys, got_values, got_valid, at,
                               0.125)  # fmt: skip
        assert out.shape == (B, H, D) and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=0)
        assert torch.equal(got_values, want_values)
        # The rotated key rounded once from float32 on both sides: at most one bf16 step.
        torch.testing.assert_close(got_keys, want_keys, atol=0, rtol=2**-7)
        assert torch.equal(got_keys[:, :, :slot], keys[:, :, :slot])
    # Slots past the step's one are never read: garbage there changes nothing.
    at, marked = torch.tensor([135], device="cuda"), valid.clone()
    marked[:, 135] = True
    before = decode_attention(q, k_new, v_new, cos, sin, keys.clone(), values.clone(), marked, at,
                              0.125)  # fmt: skip
    keys[:, :, 136:], values[:, :, 136:] = float("nan"), float("nan")
    after = decode_attention(q, k_new, v_new, cos, sin, keys, values, marked, at, 0.125)
    assert not before.isnan().any() and torch.equal(before, after)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sample_draws_from_the_tempered_softmax_across_chunks(temperature):
    """Tokens spread over the vocabulary's chunks (151,936 entries, 38 chunks a row), one of
    them with a `-inf` logit: the frequencies over 64k draws match softmax(logits / T) within
    5 standard errors, nothing else is drawn; the logprob is the untempered one; greedy takes
    the first largest."""
    from rollouts.decode_kernels import sample

    V, rows = 151_936, 8192
    where = torch.tensor([10, 4095, 4096, 70_000, 151_935, 151_934], device="cuda")
    values = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, float("-inf")], device="cuda")
    logits = torch.full((rows, V), -40.0, device="cuda", dtype=torch.bfloat16)
    logits[:, where] = values.to(torch.bfloat16)
    full = torch.log_softmax(logits[0].float(), -1)
    counts = torch.zeros(V, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    for _ in range(8):
        uniform = torch.rand(rows, device="cuda", generator=gen)
        tokens, logps = sample(logits, uniform, temperature)
        counts += torch.bincount(tokens, minlength=V)
        torch.testing.assert_close(logps, full[tokens], atol=1e-5, rtol=0)
    draws = 8 * rows
    want = torch.softmax(full / temperature, -1)[where]
    freq = counts[where] / draws
    stderr = (want * (1 - want) / draws).sqrt()
    assert torch.all((freq - want).abs() <= 5 * stderr), (freq, want)
    assert counts[where[-1]] == 0 and counts.sum() - counts[where[:5]].sum() < 5  # mass ~1e-16
    logits[:, 20] = 2.0  # a tie with token 10: the first wins
    greedy, logp = sample(logits[:2], uniform[:2], 0.0)
    assert greedy.tolist() == [10, 10]


def test_sample_follows_its_uniform_numbers_and_matches_logsumexp():
    """Equal uniform numbers draw equal tokens, others others; a uniform number next to 1
    still draws a token of nonzero probability; logprobs match torch's log-sum-exp."""
    from rollouts.decode_kernels import sample

    gen = torch.Generator("cuda").manual_seed(1)
    logits = torch.randn(64, 151_936, device="cuda", generator=gen).to(torch.bfloat16)
    u = torch.rand(64, device="cuda", generator=gen)
    a, logp_a = sample(logits, u, 1.0)
    b, _ = sample(logits, u.clone(), 1.0)
    c, _ = sample(logits, torch.rand(64, device="cuda", generator=gen), 1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    want = logits.float().gather(-1, a[:, None]).squeeze(-1) - torch.logsumexp(logits.float(), -1)
    torch.testing.assert_close(logp_a, want, atol=1e-4, rtol=0)
    edge, _ = sample(logits, torch.full((64,), 1 - 2**-24, device="cuda"), 0.5)
    assert torch.all((edge >= 0) & (edge < 151_936))
    greedy, _ = sample(logits, u, 0.0)
    assert torch.equal(greedy, logits.float().argmax(-1))


@torch.no_grad()
@pytest.mark.parametrize("compile", [False, True])
def test_static_decoder_steps_equal_with_and_without_kernels(compile, monkeypatch):
    """The decoder's bf16 logits with the kernel attention against its torch attention (the
    same CUDA graphs otherwise), at every step of left-padded prompts."""
    from rollouts import static_decode
    from tests.small_models import SMALL, random_lm
    from tests.test_static_decode import _left_padded

    model = random_lm("qwen2").to("cuda", torch.bfloat16)
    ids, mask = _left_padded(8, [7, 3, 5, 1, 8, 8, 2, 6], SMALL["vocab_size"], device="cuda")
    tokens = torch.randint(3, SMALL["vocab_size"], (10, 8), device="cuda")
    logits = {}
    for kernels in (True, False):
        monkeypatch.setattr(static_decode, "KERNELS", kernels)
        session = static_decode.StaticDecoder(model, compile=compile).start(ids, mask, 12)
        # A CUDA graph's logits buffer is overwritten by its next replay: copy each step's.
        logits[kernels] = torch.stack([session.step(token).clone() for token in tokens])
    gap = (logits[True].float() - logits[False].float()).abs().max().item()
    print(f"compile={compile}: largest logit gap kernels vs torch {gap:.4f}")
    assert gap < 0.05
