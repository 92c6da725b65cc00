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


def _reference_attention(q, keys, values, valid, slot, scale):
    """Float32 softmax attention of each query head over its KV head's slots `0..slot` that
    `valid` marks."""
    G = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(G, 1)
    v = values.float().repeat_interleave(G, 1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # [B, H, 1, S]
    allowed = valid.clone()
    allowed[:, slot + 1 :] = False
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(14, 2, 64), (4, 2, 16), (32, 8, 128)])
def test_attention_equals_masked_softmax_attention(heads, kv_heads, head_dim):
    from rollouts.decode_kernels import decode_attention

    gen = torch.Generator("cuda").manual_seed(0)
    B, S = 6, 200
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(B, heads, 1, head_dim, **kw)
    keys, values = (
        torch.randn(B, kv_heads, S, head_dim, **kw),
        torch.randn(B, kv_heads, S, head_dim, **kw),
    )
    valid = torch.ones(B, S, dtype=torch.bool, device="cuda")
    for row, pad in enumerate([0, 3, 64, 65, 130, 0]):  # left padding, across block edges
        valid[row, :pad] = False
    valid[5, 100:140] = False  # a hole: slots never written for this row
    for slot in [130, 131, 150, 191]:
        out = decode_attention(q, keys, values, valid, torch.tensor([slot], device="cuda"), 0.125)
        want = _reference_attention(q, keys, values, valid, slot, 0.125)
        assert out.shape == (B, heads, 1, head_dim) and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=0)
    # Slots past the step's one are never read: garbage there changes nothing.
    slot = torch.tensor([135], device="cuda")  # every row has a valid slot by then
    before = decode_attention(q, keys, values, valid, slot, 0.125)
    keys[:, :, 136:], values[:, :, 136:] = float("nan"), float("nan")
    after = decode_attention(q, keys, values, valid, slot, 0.125)
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
        logits[kernels] = torch.stack([session.step(token) for token in tokens])
    gap = (logits[True].float() - logits[False].float()).abs().max().item()
    print(f"compile={compile}: largest logit gap kernels vs torch {gap:.4f}")
    assert gap < 0.05
