"""The static-cache decoder computes the same logits as the plain transformers forward.

In float32 on CPU the two agree to rounding (1e-5), for the prefill of left-padded prompts
and for every decode step after it, on each supported architecture, with a LoRA adapter, and
through the HF engine (greedy tokens identical with the static cache on and off). The GPU
variant (bf16, CUDA graphs) is `test_static_decode_cuda_bf16`, marked `gpu`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rollouts import SamplingParams, create_engine
from rollouts.grouped_attention import attend_grouped, grouped_rows
from rollouts.static_decode import StaticDecoder, pick, unsupported
from tests.small_models import SMALL, random_lm


def _random_model(kind: str, **extra) -> torch.nn.Module:
    return random_lm(kind, max_position_embeddings=128, **extra).eval()


def _left_padded(batch: int, lengths: list[int], vocab: int, device="cpu"):
    width = max(lengths)
    ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    gen = torch.Generator().manual_seed(1)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, vocab, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids.to(device), mask.to(device)


def _reference_logits(model, ids, mask):
    """transformers' own forward: logits of the last position."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return out.logits[:, -1].float()


def _check_steps(
    model, ids, mask, steps: int, atol: float, compile: bool = False, rows=None, fuse=False
) -> float:
    """Prefill + `steps` decode steps, each compared with a full forward; the worst gap.
    `rows`: the decoder prefills each prompt once for the rows that decode it. `fuse`: the
    decoder's `fuse_weights`."""
    gen = torch.Generator().manual_seed(2)
    decoder = StaticDecoder(model, compile=compile, fuse_weights=fuse)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    session = decoder.start(ids, mask, max_new_tokens=steps + 1, rows_B=rows)
    assert (session.cache.fused is not None) == fuse
    if rows is not None:
        ids, mask = ids[rows], mask[rows]
    logits, worst = session.first_logits, 0.0
    for _ in range(steps + 1):
        expected = _reference_logits(model, ids, mask)
        gap = (logits.float() - expected).abs().max().item()
        assert gap <= atol, gap
        worst = max(worst, gap)
        token = torch.randint(1, SMALL["vocab_size"], (ids.shape[0],), generator=gen)
        token = token.to(ids.device)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits = session.step(token)
    session.close()
    _assert_parameters_own_and_unchanged(model, before)
    return worst


def _assert_parameters_own_and_unchanged(model, before: dict) -> None:
    """Every parameter has its values of `before` and a storage of its own (none a view of
    fused weights)."""
    storages = set()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
        ptr = param.untyped_storage().data_ptr()
        assert ptr not in storages, f"{name} shares its storage"
        storages.add(ptr)


@pytest.mark.parametrize(
    "kind,extra",
    [
        ("qwen2", {}),
        ("llama", {}),
        ("qwen3", {"head_dim": 16}),
        ("mistral", {"sliding_window": None}),
    ],
)
@torch.no_grad()
def test_prefill_and_steps_match_transformers(kind, extra):
    model = _random_model(kind, **extra)
    assert unsupported(model) is None
    ids, mask = _left_padded(4, [7, 3, 5, 1], SMALL["vocab_size"])
    _check_steps(model, ids, mask, steps=6, atol=1e-5)


@pytest.mark.parametrize("kind,extra", [("qwen2", {}), ("qwen3", {"head_dim": 16})])
@torch.no_grad()
def test_unpadded_prompts_prefill_causally_and_match_transformers(kind, extra, monkeypatch):
    """Prompts without padding are prefilled with causal attention and no mask (flash
    attention on GPU): the prefill and every step still equal the full forward, shared
    prefill too; the masked attention never runs in the prefill."""
    from rollouts import static_decode

    masked_widths = []
    allowed = static_decode.allowed_slots

    def spy(valid_BS, slots, T):
        masked_widths.append(T)
        return allowed(valid_BS, slots, T)

    monkeypatch.setattr(static_decode, "allowed_slots", spy)
    model = _random_model(kind, **extra)
    ids, mask = _left_padded(3, [6, 6, 6], SMALL["vocab_size"])
    _check_steps(model, ids, mask, steps=4, atol=1e-5)
    _check_steps(model, ids, mask, steps=3, atol=1e-5, rows=torch.tensor([2, 0, 0, 1]))
    assert masked_widths and set(masked_widths) == {1}  # the steps' masks only


@torch.no_grad()
def test_shared_prefill_matches_transformers():
    """Prompts prefilled once and copied to the rows that sample them (rows out of prompt
    order): every step equals the full forward of the expanded batch."""
    model = _random_model("qwen2")
    ids, mask = _left_padded(3, [6, 2, 4], SMALL["vocab_size"])
    rows = torch.tensor([0, 0, 2, 1, 2, 2, 0])
    _check_steps(model, ids, mask, steps=5, atol=1e-5, rows=rows)


@pytest.mark.parametrize(
    "kind,extra,lengths",
    [("qwen2", {}, [6, 2, 4]), ("qwen3", {"head_dim": 16}, [6, 2, 4]), ("qwen2", {}, [4, 4, 4])],
)
@torch.no_grad()
def test_grouped_rows_keep_one_prompt_cache(kind, extra, lengths):
    """Rows in equal, contiguous groups per prompt (the HF engine's layout): eager steps keep
    each prompt's cache once and the rows' own caches hold only new tokens; every step equals
    the full forward of the expanded batch, with and without left padding."""
    model = _random_model(kind, **extra)
    ids, mask = _left_padded(3, lengths, SMALL["vocab_size"])
    rows = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    session = StaticDecoder(model).start(ids, mask, max_new_tokens=7, rows_B=rows)
    assert session.cache.prompts is not None
    assert session.cache.prompts.unpadded == (len(set(lengths)) == 1)
    assert session.cache.prompts.keys[0].shape[0] == 3
    assert session.cache.keys[0].shape[:3] == (9, model.config.num_key_value_heads, 7)
    _check_steps(model, ids, mask, steps=5, atol=1e-5, rows=rows)


def test_grouped_rows():
    assert grouped_rows(torch.tensor([0, 0, 1, 1, 2, 2]), 3)
    assert grouped_rows(torch.tensor([0, 1, 2]), 3)
    assert not grouped_rows(torch.tensor([0, 1, 0, 1]), 2)  # not contiguous
    assert not grouped_rows(torch.tensor([0, 0, 0, 1]), 2)  # unequal groups
    assert not grouped_rows(torch.tensor([0, 0, 1, 1, 2]), 3)


def test_attend_grouped_equals_attention_over_all_keys():
    """Two query heads per KV head, two rows per prompt, left padding in one prompt: equal to
    softmax attention over the prompt's keys followed by the row's own."""
    gen = torch.Generator().manual_seed(0)
    U, n, K, G, P, S, D = 2, 2, 2, 2, 5, 3, 8
    B = U * n
    q = torch.randn(B, K * G, 1, D, generator=gen)
    pk, pv = torch.randn(2, U, K, P, D, generator=gen)
    k, v = torch.randn(2, B, K, S, D, generator=gen)
    valid = torch.ones(U, P, dtype=torch.bool)
    valid[1, :2] = False
    out = attend_grouped(q, pk, pv, valid, k, v, 0.3)
    unmasked = attend_grouped(q, pk, pv, None, k, v, 0.3)
    rows = torch.arange(U).repeat_interleave(n)
    keys = torch.cat([pk[rows], k], 2).repeat_interleave(G, 1)
    values = torch.cat([pv[rows], v], 2).repeat_interleave(G, 1)
    allowed = torch.cat([valid[rows], torch.ones(B, S, dtype=torch.bool)], 1)[:, None, None]
    scores = (q @ keys.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))
    expected = torch.softmax(scores, -1) @ values
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    scores = q @ keys.transpose(-1, -2) * 0.3
    torch.testing.assert_close(unmasked, torch.softmax(scores, -1) @ values, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("limit", ["PREFILL_TOKENS", "CPU_PREFILL_TOKENS"])
@torch.no_grad()
def test_prefill_in_row_chunks(monkeypatch, limit):
    """Prompts prefilled a few rows at a time give the same cache and logits; on CPU the
    smaller of the two limits sets the chunk."""
    from rollouts import static_decode

    model = _random_model("qwen2")
    ids, mask = _left_padded(5, [7, 3, 5, 1, 6], SMALL["vocab_size"])
    monkeypatch.setattr(static_decode, limit, 14)  # 2 rows of 7 tokens per chunk
    calls = []
    forward = StaticDecoder._forward
    monkeypatch.setattr(
        StaticDecoder, "_forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k)
    )
    StaticDecoder(model).start(ids, mask, max_new_tokens=2)
    assert len(calls) == 3  # rows 0-1, 2-3, 4
    _check_steps(model, ids, mask, steps=3, atol=1e-5)


def test_cuda_prefill_parts_keep_activations_within_a_share_of_the_cache():
    """On CUDA the prefill's parts are bounded by the cache they sit on (a small batch's whole
    prompt set at once peaked above transformers `generate`), in equal parts but the last."""
    from rollouts import static_decode

    decoder = StaticDecoder(_random_model("qwen2"))
    intermediate = decoder.lm.config.intermediate_size
    cuda = torch.device("cuda")  # only the device type is read
    for U, P, S in [(64, 16, 48), (256, 16, 48), (5, 40, 41), (3, 4, 8)]:
        cache = decoder._empty_cache(U, S, torch.device("cpu"))
        rows = decoder._prefill_rows(U, P, cache, cuda)
        share = static_decode.PREFILL_SHARE * sum(t.nbytes for t in cache.keys + cache.values)
        assert rows == 1 or rows * P * 6 * intermediate * 4 <= share
        assert rows <= static_decode.PREFILL_TOKENS // P or rows == 1
        parts = -(-U // rows)
        assert (parts - 1) * rows < U  # no empty part; sizes differ only in the last
        if U in (64, 256):
            assert U % rows == 0  # equal parts where a divisor is near the largest size
    # Off CUDA the CPU limit alone applies (the same as before the share).
    cache = decoder._empty_cache(64, 48, torch.device("cpu"))
    assert decoder._prefill_rows(64, 16, cache, torch.device("cpu")) == 64


@pytest.mark.parametrize(
    "kind,extra,rows",
    [
        ("qwen2", {}, None),  # q/k/v with biases
        ("llama", {}, None),
        ("qwen3", {"head_dim": 16}, None),
        ("qwen2", {}, [0, 0, 2, 1, 2, 2, 0]),  # shared prefill
        ("qwen2", {}, [0, 0, 1, 1, 2, 2]),  # grouped rows (eager steps)
    ],
)
@torch.no_grad()
def test_fused_weights_steps_match_transformers(kind, extra, rows):
    """Decode steps with q/k/v and gate/up each as one matmul: every step equals the full
    forward."""
    model = _random_model(kind, **extra)
    ids, mask = _left_padded(3, [6, 2, 4], SMALL["vocab_size"])
    rows = None if rows is None else torch.tensor(rows)
    _check_steps(model, ids, mask, steps=5, atol=1e-5, rows=rows, fuse=True)


@torch.no_grad()
def test_fused_weights_are_the_parameters_until_close_and_survive_errors(tmp_path):
    """While a session runs, the fused q/k/v and gate/up rows are the model's own parameters
    (same `Parameter` objects, no second copy); `close` gives each its storage back, the model
    then saves and reloads unchanged; a prefill that fails unfuses before raising."""
    from transformers import AutoModelForCausalLM

    model = _random_model("qwen2")
    attn = model.model.layers[0].self_attn
    q_param, before = attn.q_proj.weight, {n: p.clone() for n, p in model.named_parameters()}
    ids, mask = _left_padded(2, [3, 5], SMALL["vocab_size"])
    session = StaticDecoder(model, fuse_weights=True).start(ids, mask, 4)
    fused = session.cache.fused[0]
    assert attn.q_proj.weight is q_param
    for module, rows in [(attn.q_proj, 0), (attn.k_proj, attn.q_proj.out_features)]:
        assert module.weight.data_ptr() == fused.qkv_weight[rows].data_ptr()
    session.step(torch.tensor([5, 6]))
    session.close()
    assert attn.q_proj.weight is q_param and session.cache.fused is None
    _assert_parameters_own_and_unchanged(model, before)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, before[name]), name

    with torch.inference_mode():  # a caller's inference mode leaves no inference tensors
        session = StaticDecoder(model, fuse_weights=True).start(ids, mask, 4)
        session.step(torch.tensor([5, 6]))
        session.close()
    assert not any(p.is_inference() for p in model.parameters())
    _assert_parameters_own_and_unchanged(model, before)

    decoder = StaticDecoder(model, fuse_weights=True)

    def failing_prefill(*args, **kwargs):
        raise RuntimeError("prefill failed")

    decoder.prefill = failing_prefill
    decoder._forward = failing_prefill
    with pytest.raises(RuntimeError, match="prefill failed"):
        decoder.start(ids, mask, 4)
    _assert_parameters_own_and_unchanged(model, before)
    with pytest.raises(RuntimeError, match="is closed"):
        session.step(torch.tensor([5, 6]))


@torch.no_grad()
def test_failures_while_fusing_or_after_the_prefill_leave_no_parameter_fused(monkeypatch):
    """Out of memory halfway through fusing (the third group of weights), or in the first
    logits after the prefill (before any session exists to close): every parameter has its
    own storage and values again when the error reaches the caller."""
    from rollouts import fused_weights

    model = _random_model("qwen2")
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids, mask = _left_padded(2, [3, 5], SMALL["vocab_size"])
    concat, calls = fused_weights._concat, []

    def third_fails(modules):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("out of memory fusing")
        return concat(modules)

    monkeypatch.setattr(fused_weights, "_concat", third_fails)
    with pytest.raises(torch.OutOfMemoryError, match="fusing"):
        StaticDecoder(model, fuse_weights=True).start(ids, mask, 4)
    _assert_parameters_own_and_unchanged(model, before)
    monkeypatch.setattr(fused_weights, "_concat", concat)

    decoder = StaticDecoder(model, fuse_weights=True)

    def logits_fail(hidden):
        raise torch.OutOfMemoryError("out of memory in the head")

    decoder.logits = logits_fail
    with pytest.raises(torch.OutOfMemoryError, match="head"):
        decoder.start(ids, mask, 4)
    _assert_parameters_own_and_unchanged(model, before)


@torch.no_grad()
def test_fused_weights_skip_lora_wrapped_projections():
    """A LoRA on q and v leaves q/k/v unfused (the adapter still applies) and gate/up fused."""
    from peft import LoraConfig, get_peft_model

    from rollouts.fused_weights import fuse_layers, unfuse

    model = _random_model("qwen2")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    fused = fuse_layers(peft_model.get_base_model().model.layers)
    assert all(f.qkv_weight is None and f.gate_up_weight is not None for f in fused)
    mlp = peft_model.get_base_model().model.layers[0].mlp
    assert fused[0].gate_up_weight.shape == (2 * mlp.intermediate_size, mlp.hidden_size)
    unfuse(fused)
    ids, mask = _left_padded(3, [4, 6, 2], SMALL["vocab_size"])
    _check_steps(peft_model, ids, mask, steps=3, atol=1e-5, fuse=True)


@torch.no_grad()
def test_lora_adapter_is_applied():
    from peft import LoraConfig, get_peft_model

    model = _random_model("qwen2")
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config).eval()
    ids, mask = _left_padded(3, [4, 6, 2], SMALL["vocab_size"])
    _check_steps(peft_model, ids, mask, steps=3, atol=1e-5)
    with peft_model.disable_adapter():
        base = _reference_logits(peft_model, ids, mask)
    lora = StaticDecoder(peft_model).start(ids, mask, 1).first_logits
    assert (lora - base).abs().max() > 1e-3  # the adapter really changes the output


def test_unsupported_models_fall_back_to_transformers_cache(tiny):
    model, tokenizer = tiny
    assert unsupported(model) is None
    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=400)
    )
    assert "gpt2" in unsupported(gpt2)
    sliding = _random_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert "sliding" in unsupported(sliding)
    with pytest.raises(ValueError, match="static decoding cannot run"):
        StaticDecoder(gpt2)
    engine = create_engine("hf", model=gpt2, tokenizer=tokenizer)
    assert engine.static_cache is False
    groups = engine.generate(["1+1="], 2, SamplingParams(max_new_tokens=3, seed=0))
    assert all(1 <= len(s.completion_ids) <= 3 for s in groups[0].samples)


@pytest.mark.parametrize("fuse", [False, True])
def test_engine_greedy_identical_with_and_without_static_cache(tiny, fuse):
    model, tokenizer = tiny
    prompts = ["12+34=", "7+8=", "99+99=", "5+5="]
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    fast = create_engine("hf", model=model, tokenizer=tokenizer, batch_size=3, fuse_weights=fuse)
    plain = create_engine("hf", model=model, tokenizer=tokenizer, batch_size=3, static_cache=False)
    assert fast.static_cache and not plain.static_cache
    a = [s for g in fast.generate(prompts, 2, greedy) for s in g.samples]
    b = [s for g in plain.generate(prompts, 2, greedy) for s in g.samples]
    assert [s.completion_ids for s in a] == [s.completion_ids for s in b]
    assert [s.finish_reason for s in a] == [s.finish_reason for s in b]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(
            torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0
        )


def test_ignore_eos_runs_to_the_limit(tiny):
    model, tokenizer = tiny
    engine = create_engine("hf", model=model, tokenizer=tokenizer)
    sampling = SamplingParams(max_new_tokens=12, seed=0, ignore_eos=True)
    samples = [s for g in engine.generate(["1+2="], 16, sampling) for s in g.samples]
    assert all(len(s.completion_ids) == 12 and s.finish_reason == "length" for s in samples)


@pytest.mark.gpu
def test_engine_logprobs_on_cuda_are_each_steps_own(tiny):
    """On CUDA the draw runs inside a CUDA graph whose outputs its next replay overwrites:
    every sampled token's logprob still equals the engine's recomputed logprob of that token,
    step by step (float32 model)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, tokenizer = tiny
    engine = create_engine("hf", model=model.to("cuda"), tokenizer=tokenizer, batch_size=8)
    sampling = SamplingParams(max_new_tokens=12, seed=0, ignore_eos=True)
    samples = [s for g in engine.generate(["12+34=", "7+8="], 4, sampling) for s in g.samples]
    recomputed = engine.logprobs([s.prompt_ids + s.completion_ids for s in samples])
    for sample, full in zip(samples, recomputed, strict=True):
        want = torch.tensor(full[len(sample.prompt_ids) :])
        torch.testing.assert_close(torch.tensor(sample.logprobs), want, atol=1e-3, rtol=0)
    assert len({tuple(s.logprobs) for s in samples}) > 1


@pytest.mark.gpu
def test_repeated_cuda_generate_calls_hold_no_more_memory(tiny):
    """Each call captures its CUDA graphs on the decoder's one side stream: a new stream per
    call left a cuBLAS workspace behind each time (allocated memory grew every call)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, tokenizer = tiny
    engine = create_engine("hf", model=model.to("cuda"), tokenizer=tokenizer, batch_size=8)
    sampling = SamplingParams(max_new_tokens=6, seed=0, ignore_eos=True)
    held = []
    for _ in range(4):
        engine.generate(["12+34=", "7+8="], 4, sampling)
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated())
    assert held[1] == held[2] == held[3], held


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("compile", [False, True])
@torch.no_grad()
def test_static_decode_cuda_bf16(compile, fuse):
    """On GPU: the CUDA-graph step in bf16 (compiled or not, fused weights or not) stays within
    bf16 rounding of transformers."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _random_model("qwen2").to("cuda", torch.bfloat16)
    ids, mask = _left_padded(8, [7, 3, 5, 1, 8, 8, 2, 6], SMALL["vocab_size"], device="cuda")
    worst = _check_steps(model, ids, mask, steps=8, atol=0.05, compile=compile, fuse=fuse)
    print(f"compile={compile}, fuse={fuse}: largest bf16 logit gap {worst:.4f}")
    rows = torch.tensor([0, 0, 3, 1, 3, 7, 7, 7], device="cuda")  # shared prefill
    worst = _check_steps(
        model, ids, mask, steps=8, atol=0.05, compile=compile, rows=rows, fuse=fuse
    )
    print(f"compile={compile}, fuse={fuse}, shared prefill: largest bf16 logit gap {worst:.4f}")
    # The draw inside the graph: greedy tokens equal the argmax of the logits path.
    decoder = StaticDecoder(model, compile=compile, fuse_weights=fuse)
    plain, fused = decoder.start(ids, mask, 9), decoder.start(ids, mask, 9)
    token = fused_token = plain.first_logits.argmax(-1)
    for _ in range(8):
        token = plain.step(token).argmax(-1)
        fused_token, _ = fused.step_sample(fused_token, 0.0, None)
        assert torch.equal(token, fused_token)


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_pick_in_row_chunks_equals_pick(temperature):
    """The first token's eager draw, a few rows at a time: the same tokens and logprobs."""
    from rollouts.draw import pick_in_row_chunks

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn((70, 50), generator=gen)
    uniform = torch.rand((70, 50 if temperature else 1), generator=gen)
    tokens, logps = pick(logits, uniform, temperature)
    chunked_tokens, chunked_logps = pick_in_row_chunks(logits, uniform, temperature, rows=32)
    assert torch.equal(tokens, chunked_tokens) and torch.equal(logps, chunked_logps)


def test_pick_draws_from_the_tempered_softmax():
    """Gumbel-max: token frequencies over 200k draws match softmax(logits / T) (within 5
    standard errors); the logprob returned is the untempered one; T = 0 is argmax."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    rows, T = 200_000, 0.7
    uniform = torch.rand((rows, 5), generator=torch.Generator().manual_seed(0))
    tokens, logps = pick(logits.expand(rows, 5), uniform, T)
    want = torch.softmax(logits[0] / T, -1)
    freq = torch.bincount(tokens, minlength=5).double() / rows
    stderr = (want * (1 - want) / rows).sqrt()
    assert torch.all((freq - want).abs() <= 5 * stderr), (freq, want)
    torch.testing.assert_close(logps, torch.log_softmax(logits[0], -1)[tokens])
    greedy, logp = pick(logits, uniform[:1], 0.0)
    assert greedy.item() == 0 and logp.item() == pytest.approx(torch.log_softmax(logits, -1)[0, 0])


@torch.no_grad()
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_step_sample_equals_step_then_pick(temperature):
    """The fused step (draw inside the step) picks what `pick` picks from `step`'s logits with
    the same noise."""
    model = _random_model("qwen2")
    ids, mask = _left_padded(4, [5, 2, 4, 3], SMALL["vocab_size"])
    decoder = StaticDecoder(model)
    plain, fused = decoder.start(ids, mask, 6), decoder.start(ids, mask, 6)
    steps, noise = _step_then_pick_beside_step_sample(plain, fused, temperature, seed=5)
    assert noise.shape == (4, SMALL["vocab_size"] if temperature else 1)  # greedy reads none
    for token, logp, fused_token, fused_logp in steps:
        assert torch.equal(token, fused_token)
        torch.testing.assert_close(logp, fused_logp)


def _step_then_pick_beside_step_sample(plain, other, temperature: float, seed: int):
    """Five steps of `plain.step` + `pick` and of `other.step_sample` on equally seeded noise:
    per step (token, logp, other's token, other's logp), and `other`'s noise buffer."""
    gens = [torch.Generator().manual_seed(seed) for _ in range(2)]
    token, _ = pick(plain.first_logits, plain.noise(temperature, gens[0]), temperature)
    noise = other.noise(temperature, gens[1])
    other_token, steps = token, []
    for _ in range(5):
        token, logp = pick(plain.step(token), plain.noise(temperature, gens[0]), temperature)
        other_token, other_logp = other.step_sample(other_token, temperature, gens[1])
        steps.append((token, logp, other_token, other_logp))
    return steps, noise


@torch.no_grad()
def test_compiled_step_sample_equals_eager_step_then_pick():
    """The compiled step (the GPU default, here on CPU): greedy with fused weights and the
    `[B, 1]` noise stand-in, and sampling at temperature 1 unfused, pick what the eager step
    and `pick` pick, with logprobs within 1e-5."""
    model = _random_model("qwen2")
    ids, mask = _left_padded(4, [5, 2, 4, 3], SMALL["vocab_size"])
    for temperature, fuse in [(0.0, True), (1.0, False)]:
        plain = StaticDecoder(model).start(ids, mask, 6)
        compiled = StaticDecoder(model, compile=True, fuse_weights=fuse).start(ids, mask, 6)
        steps, _ = _step_then_pick_beside_step_sample(plain, compiled, temperature, seed=3)
        for token, logp, compiled_token, compiled_logp in steps:
            assert torch.equal(token, compiled_token), temperature
            torch.testing.assert_close(logp, compiled_logp, atol=1e-5, rtol=0)
        compiled.close()


def test_fsdp2_sharded_parameters_fall_back_to_transformers():
    """FSDP2 gathers weights in hooks on the layers and the root forward, which the static
    decoder bypasses: a model whose parameters are DTensors is unsupported (the HF engine then
    decodes through the model's forward)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = _random_model("qwen2")
    assert unsupported(model) is None
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                sharded = distribute_tensor(p.detach(), mesh, [Shard(0)])
                setattr(module, name, torch.nn.Parameter(sharded))
        assert unsupported(model) == "parameters sharded by FSDP2"
    finally:
        dist.destroy_process_group()
