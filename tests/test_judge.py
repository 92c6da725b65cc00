"""LLM judge: swap-debiasing, pointwise reward, retries, timeouts, API key, cache, vLLM server.

Most tests talk to `tests/judge_server.py`, a real HTTP server on loopback with a scripted
(position-biased, failing, slow) judge. The `vllm` tests start one vLLM OpenAI server of the
tiny model: its judgements are random, but structured output makes every one parse.

Run: `pytest tests/test_judge.py` (add `-m vllm` for the vLLM part alone).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from rewards import RewardTerm, Rubric
from rewards.calls import check_signature
from rewards.judge import (
    JudgeConfigError,
    JudgeEndpoint,
    JudgeError,
    PairVerdict,
    PairwiseJudge,
    PointwiseJudge,
    judge_score,
    pair_metrics,
    pairwise_judge,
    position_consistency,
    win_rate,
)
from rewards.judge_cache import VerdictCache
from rewards.judge_pairwise import debias
from rewards.types import Failed, Scored
from tests.judge_server import JudgeServer

KEY_VAR = "POSTTRAIN_TEST_JUDGE_KEY"
KEY = "sk-test-0123456789abcdef"
FAST = {"backoff": 0.01, "timeout": 10.0}


def endpoint(server: JudgeServer, **options) -> JudgeEndpoint:
    return JudgeEndpoint(base_url=server.url, model="judge", **{**FAST, **options})


def _between(text: str, title: str) -> str | None:
    found = re.search(rf"\[{title}\]\n(.*?)\n\[End of {title.lower()}\]", text, re.S)
    return found.group(1) if found else None


def prefers_the_reference(body: dict) -> dict:
    """Picks the response that contains the reference answer; unsure, it says "A"."""
    text = "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")
    reference = _between(text, "Reference answer")
    for letter in ("A", "B"):
        if reference in _between(text, f"Response {letter}"):
            return {"rationale": f"{letter} has the answer {reference}.", "winner": letter}
    return {"rationale": "Neither is right; I pick the first.", "winner": "A"}


# ---------------------------------------------------------------------------------------------
# Pairwise: both orders, debiasing, metrics


def test_swap_debiasing_cancels_a_judge_that_always_says_a():
    prompts = ["6*7=", "2+2=", "9-3="]
    a, b = ["42", "4", "5"], ["41", "5", "6"]
    with JudgeServer() as server:
        verdicts = PairwiseJudge(endpoint(server)).compare(prompts, a, b)
        shown_first = [_between(r.user_text, "Response A") for r in server.received]
    assert sorted(shown_first) == sorted(a + b)  # every completion was shown first once
    assert [(v.winner, v.consistent, v.raw_ab, v.raw_ba) for v in verdicts] == [
        ("tie", False, "A", "A")
    ] * 3
    assert position_consistency(verdicts) == 0.0
    assert win_rate(verdicts) == 0.5


PAIRS = [  # completion a, completion b, reference -> winner, consistent
    ("42", "41", "42", "a", True),
    ("41", "the answer is 42", "42", "b", True),
    ("40", "41", "42", "tie", False),  # unsure: falls back on position, which cancels
    ("42", "42.", "42", "tie", False),  # both contain it: first shown wins each time
]


def test_a_judge_biased_only_when_unsure_gives_consistent_verdicts():
    a, b, refs, winners, consistent = (list(col) for col in zip(*PAIRS, strict=True))
    with JudgeServer(prefers_the_reference) as server:
        verdicts = PairwiseJudge(endpoint(server)).compare(["6*7="] * len(a), a, b, refs)
    assert [v.winner for v in verdicts] == winners
    assert [v.consistent for v in verdicts] == consistent
    assert position_consistency(verdicts) == 0.5
    assert verdicts[1].rationale_ab == "B has the answer 42."
    assert verdicts[1].rationale_ba == "A has the answer 42."


@pytest.mark.parametrize(
    ("raw_ab", "raw_ba", "winner", "consistent"),
    [
        ("A", "B", "a", True),
        ("B", "A", "b", True),
        ("tie", "tie", "tie", True),
        ("A", "A", "tie", False),
        ("B", "B", "tie", False),
        ("A", "tie", "tie", False),
        ("tie", "A", "tie", False),
    ],
)
def test_debias_table(raw_ab, raw_ba, winner, consistent):
    v = debias({"winner": raw_ab, "rationale": "x"}, {"winner": raw_ba, "rationale": "y"})
    assert (v.winner, v.consistent, v.raw_ab, v.raw_ba) == (winner, consistent, raw_ab, raw_ba)


def _verdict(winner: str, consistent: bool) -> PairVerdict:
    return PairVerdict(winner, consistent, "A", "B", "", "")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ([("a", True), ("a", True)], (1.0, 0.0, 1.0)),
        ([("a", True), ("b", True)], (0.5, 0.0, 1.0)),
        ([("a", True), ("tie", False), ("b", True), ("tie", True)], (0.5, 0.5, 0.75)),
        ([("b", True), ("tie", False), ("tie", False), ("tie", False)], (0.375, 0.75, 0.25)),
    ],
)
def test_pair_metrics_table(verdicts, expected):
    metrics = pair_metrics([_verdict(w, c) for w, c in verdicts], prefix="eval/judge")
    assert metrics == {
        "eval/judge/win_rate": expected[0],
        "eval/judge/tie_rate": expected[1],
        "eval/judge/position_consistency": expected[2],
    }


def test_metrics_of_no_verdicts_are_an_error():
    with pytest.raises(ValueError, match="at least one verdict"):
        win_rate([])


def test_pairwise_without_ties_asks_for_a_or_b_only():
    with JudgeServer() as server:
        judge = pairwise_judge(base_url=server.url, model="judge", allow_tie=False, **FAST)
        judge.compare(["q"], ["x"], ["y"])
        schema = server.received[0].body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["winner"]["enum"] == ["A", "B"]
    assert '"tie"' not in server.received[0].body["messages"][0]["content"]


# ---------------------------------------------------------------------------------------------
# Pointwise reward


@pytest.mark.parametrize(
    ("scale", "score", "expected"),
    [((1, 10), 7, 6 / 9), ((1, 5), 5, 1.0), ((0, 1), 0, 0.0), ((-2, 2), 1, 0.75)],
)
def test_pointwise_reward_maps_the_score_to_0_1_with_the_rationale(scale, score, expected):
    with JudgeServer(lambda body: {"rationale": f"looks like a {score}", "score": score}) as s:
        reward = judge_score(base_url=s.url, model="judge", scale=list(scale), **FAST)
        out = reward(prompts=["1+1=", "2+2="], completions=["2", [{"role": "a", "content": "4"}]])
        schema = s.received[0].body["response_format"]["json_schema"]["schema"]
    assert out == [Scored(pytest.approx(expected), f"looks like a {score}")] * 2
    assert schema["properties"]["score"]["enum"] == list(range(scale[0], scale[1] + 1))
    assert list(schema["properties"]) == ["rationale", "score"]  # rationale before the score
    assert reward.__name__ == "judge_score"


def test_reference_based_and_reference_free_prompts():
    with JudgeServer() as server:
        with_ref = judge_score(base_url=server.url, model="judge", reference_column="answer")
        out = with_ref(
            prompts=["6*7=", "1+1=", "2+3="], completions=["42", "2", "5"], answer=["42", None, 5]
        )
        free = judge_score(base_url=server.url, model="judge", criteria="brevity")
        free(prompts=["6*7="], completions=["42"])
        texts = [r.user_text for r in server.received]
        systems = [r.body["messages"][0]["content"] for r in server.received]
    assert out[1] is None  # no reference: not applicable, and not asked
    assert [isinstance(v, Scored) for v in out] == [True, False, True]
    assert len(texts) == 3
    assert sorted(_between(t, "Reference answer") for t in texts[:2]) == ["42", "5"]
    assert _between(texts[2], "Reference answer") is None
    assert _between(texts[2], "Response") == "42" and _between(texts[2], "Question") == "6*7="
    assert "reference answer" in systems[0] and "reference" not in systems[2]
    assert "brevity" in systems[2]


def test_reference_column_is_checked_when_the_rubric_is_built():
    reward = judge_score(
        base_url="http://127.0.0.1:9/v1", model="judge", reference_column="gold",
        check_endpoint=False,
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"needs column\(s\) \['gold'\]"):
        check_signature("judge", reward, columns=["answer"])
    assert check_signature("judge", reward, columns=["gold"]) is None
    with pytest.raises(ValueError, match="reference_column 'gold' is not among"):
        reward(prompts=["q"], completions=["c"], answer=["a"])


def test_judge_in_a_rubric_with_feedback_and_counted_failures():
    with JudgeServer(fail_first=1) as server:
        reward = judge_score(base_url=server.url, model="judge", retries=0, **FAST)
        rubric = Rubric([RewardTerm("judge", reward)], on_error="count", max_error_rate=1.0)
        scores = rubric.score(["q1"], ["c1"])  # the only request gets HTTP 500: counted
        assert scores.components["judge"] == [None] and scores.errors == {"judge": 1}
        scores = rubric.score(["q1", "q2"], ["c1", "c2"])
    assert scores.components["judge"] == [pytest.approx(6 / 9)] * 2
    assert scores.feedback["judge"] == ["Fixed score 7."] * 2


def test_reward_works_from_a_worker_thread_and_inside_an_event_loop():
    import asyncio

    results = []
    with JudgeServer() as server:
        reward = judge_score(base_url=server.url, model="judge", **FAST)
        worker = threading.Thread(target=lambda: results.append(reward(["q"], ["c"])))
        worker.start()
        worker.join()

        async def inside_a_loop():
            return reward(["q"], ["c"])

        results.append(asyncio.run(inside_a_loop()))
    assert [r[0].score for r in results] == [pytest.approx(6 / 9)] * 2


# ---------------------------------------------------------------------------------------------
# Transport: retries, errors, timeouts, concurrency


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_failures_are_retried(status):
    with JudgeServer(fail_first=2, fail_status=status, retry_after="0") as server:
        judge = PointwiseJudge(endpoint(server, retries=3))
        verdicts = judge.score(["q"], ["c"])
    assert [v.score for v in verdicts] == [7]
    assert len(server.received) == 3
    assert judge.stats == {"requests": 3, "retries": 2}


def test_retries_run_out_into_a_clear_error_or_a_failed_sample():
    with JudgeServer(fail_first=100, error_message="overloaded") as server:
        judge = PointwiseJudge(endpoint(server, retries=2))
        with pytest.raises(JudgeError, match=r"sample 0: .*3 attempt\(s\) failed.*HTTP 500: overl"):
            judge.score(["q"], ["c"])
        assert len(server.received) == 3
        reward = judge_score(base_url=server.url, model="judge", retries=1, **FAST)
        out = reward(prompts=["q"], completions=["c"])
    assert isinstance(out[0], Failed) and "HTTP 500: overloaded" in out[0].error


@pytest.mark.parametrize(
    ("status", "error"), [(400, JudgeError), (422, JudgeError), (401, JudgeConfigError)]
)
def test_client_errors_fail_at_once_with_the_servers_message(status, error):
    with JudgeServer(error_status=status, error_message="context length exceeded") as server:
        with pytest.raises(error, match=f"HTTP {status}: context length exceeded"):
            PointwiseJudge(endpoint(server, retries=3)).score(["q"], ["c"])
        assert len(server.received) == 1


def test_unauthorised_raises_from_the_reward_too():
    with JudgeServer(error_status=401, error_message="bad key") as server:
        reward = judge_score(base_url=server.url, model="judge", **FAST)
        with pytest.raises(JudgeConfigError, match="HTTP 401: bad key"):
            reward(prompts=["q", "r"], completions=["c", "d"])


def test_a_slow_judge_times_out_after_the_retries():
    with JudgeServer(delay=1.0) as server:
        judge = PointwiseJudge(endpoint(server, timeout=0.2, retries=1))
        with pytest.raises(JudgeError, match=r"2 attempt\(s\) failed.*within timeout=0.2 s"):
            judge.score(["q"], ["c"])
        # The client gave up on each attempt without an answer, so the server may not have
        # read the second request yet (it records a request once it has read its body).
        server.wait_for_requests(2)
        assert len(server.received) == 2


@pytest.mark.parametrize(
    ("reply", "pairwise", "message"),
    [
        ({"content": "I think 7"}, False, "unusable answer: Expecting value"),
        ({"content": '{"rationale": "x", "score": 11}'}, False, "from 1 to 10, got 11"),
        ({"content": '{"rationale": "x", "score": true}'}, False, "from 1 to 10, got True"),
        ({"content": '{"score": 3}'}, False, "'rationale' must be a string"),
        ({"content": '["A"]'}, True, "expected a JSON object"),
        ({"content": '{"rationale": "x", "winner": "C"}'}, True, r"\['A', 'B', 'tie'\], got 'C'"),
        ({"finish_reason": "length"}, False, "cut at max_tokens=1664"),
    ],
)
def test_unusable_answers_are_retried_then_raise(reply, pairwise, message):
    with JudgeServer(**reply) as server:
        if pairwise:
            judge = PairwiseJudge(endpoint(server, retries=1))
            call = lambda: judge.compare(["q"], ["a"], ["b"])  # noqa: E731
        else:
            judge = PointwiseJudge(endpoint(server, retries=1))
            call = lambda: judge.score(["q"], ["c"])  # noqa: E731
        with pytest.raises(JudgeError, match=message):
            call()
    assert judge.stats["invalid_answers"] == 2 * (2 if pairwise else 1)  # 2 attempts each


def test_at_most_max_concurrent_requests_are_in_flight():
    with JudgeServer(delay=0.3) as server:
        judge = PointwiseJudge(endpoint(server, max_concurrent=2))
        verdicts = judge.score(["q"] * 6, [f"c{i}" for i in range(6)])
    assert len(verdicts) == 6
    assert server.max_in_flight == 2


# ---------------------------------------------------------------------------------------------
# API key


def test_the_key_comes_from_the_named_variable_and_is_never_written(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_VAR, KEY)
    with JudgeServer() as server:
        reward = judge_score(
            base_url=server.url, model="judge", api_key_env=KEY_VAR, cache_dir=str(tmp_path)
        )
        reward(prompts=["q"], completions=["c"])
        keyless = judge_score(base_url=server.url, model="judge")
        keyless(prompts=["q2"], completions=["c"])
    assert server.received[0].headers["Authorization"] == f"Bearer {KEY}"
    assert "Authorization" not in server.received[1].headers
    assert KEY not in repr(reward.judge) and KEY_VAR in repr(reward.judge)
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 1 and all(KEY not in f.read_text() for f in files)


def test_an_unset_key_variable_is_a_clear_error_naming_it(monkeypatch):
    monkeypatch.delenv(KEY_VAR, raising=False)
    with pytest.raises(JudgeConfigError, match=f"variable {KEY_VAR} is not set"):
        judge_score(base_url="http://127.0.0.1:9/v1", model="judge", api_key_env=KEY_VAR)
    monkeypatch.setenv(KEY_VAR, KEY)
    with JudgeServer() as server:
        reward = judge_score(base_url=server.url, model="judge", api_key_env=KEY_VAR)
        monkeypatch.delenv(KEY_VAR)  # unset after start-up: read at request time
        with pytest.raises(JudgeConfigError, match=f"export {KEY_VAR}="):
            reward(prompts=["q"], completions=["c"])
    assert server.received == []


def test_a_key_given_as_the_variable_name_is_refused_without_echoing_it():
    with pytest.raises(ValueError, match="NAME of an environment variable") as info:
        judge_score(base_url="http://127.0.0.1:9/v1", model="judge", api_key_env=KEY)
    assert KEY not in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"base_url": "127.0.0.1:8000/v1"}, "base_url must start with http"),
        ({"model": ""}, "model must name"),
        ({"scale": [5, 1]}, "scale must be two integers"),
        ({"scale": [1, 2, 3]}, "scale must be two integers"),
        ({"scale": [1.5, 3]}, "scale must be two integers"),
        ({"criteria": " "}, "criteria must be a non-empty string"),
        ({"max_concurrent": 0}, "max_concurrent is out of range"),
        ({"retries": -1}, "retries is out of range"),
        ({"timeout": 0}, "timeout is out of range"),
        ({"max_tokens": 0}, "max_tokens is out of range"),
        ({"rationale_max_chars": 0}, "rationale_max_chars must be a positive integer"),
        ({"reference_column": "the answer"}, "reference_column must name a dataset column"),
        ({"reference_column": "completions"}, "reference_column must name a dataset column"),
    ],
)
def test_bad_options_are_errors_naming_the_option(options, message):
    base = {"base_url": "http://127.0.0.1:9/v1", "model": "judge", "check_endpoint": False}
    with pytest.raises(ValueError, match=message):
        judge_score(**{**base, **options})


def test_unreachable_endpoint_fails_when_the_reward_is_built():
    with pytest.raises(ValueError, match=r"judge endpoint http://127.0.0.1:9/v1 is unreachable"):
        judge_score(base_url="http://127.0.0.1:9/v1", model="judge")


# ---------------------------------------------------------------------------------------------
# Cache


def test_cache_answers_a_repeated_request_without_asking(tmp_path):
    with JudgeServer() as server:
        first = PointwiseJudge(endpoint(server), cache_dir=tmp_path)
        prompts, completions = ["1+1=", "2+2="], ["2", "4"]
        assert [v.score for v in first.score(prompts, completions)] == [7, 7]
        again = PointwiseJudge(endpoint(server), cache_dir=tmp_path)  # a new process, say
        assert again.score(prompts, completions) == first.score(prompts, completions)
        assert len(server.received) == 2
        assert again.stats == {"cache_hits": 2}
        other = PointwiseJudge(endpoint(server), criteria="brevity", cache_dir=tmp_path)
        other.score(prompts, completions)  # another question: asked
        assert len(server.received) == 4
    assert len(VerdictCache(tmp_path)) == 4
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_unreadable_cache_file_is_asked_again_and_rewritten(tmp_path):
    with JudgeServer() as server:
        judge = PointwiseJudge(endpoint(server), cache_dir=tmp_path)
        judge.score(["q"], ["c"])
        (path,) = tmp_path.rglob("*.json")
        path.write_text('{"verdict": {"score": 99, "rationale": ""}}')
        assert judge.score(["q"], ["c"])[0].score == 7
        assert len(server.received) == 2
    assert json.loads(path.read_text())["verdict"] == {"score": 7, "rationale": "Fixed score 7."}


def test_concurrent_cache_writers_leave_one_whole_file(tmp_path):
    cache = VerdictCache(tmp_path)
    key = "ab" * 32
    entries = [{"verdict": {"winner": "A", "rationale": str(i) * 2000}} for i in range(8)]
    seen, stop = [], threading.Event()

    def write(entry):
        for _ in range(40):
            cache.put(key, entry)

    def read():
        while not stop.is_set():
            seen.append(cache.get(key))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(e,)) for e in entries]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert cache.get(key) in entries
    assert all(s is None or s in entries for s in seen)  # never a torn file
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{key}.json"]


# ---------------------------------------------------------------------------------------------
# A real vLLM server of the tiny model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_judge(tiny_path, tmp_path_factory):
    """(base_url, model id) of one vLLM server for this module, stopped at the end.

    The tiny model's 256 positions are too few for a judge prompt; its rotary embeddings have
    no learned table, so `--hf-overrides` lifts the limit without touching a weight. Compact
    JSON is enforced so the random model cannot loop on whitespace; eager mode skips a
    compilation that would cost more than these few requests.
    """
    pytest.importorskip("vllm")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-judge") / "server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_path,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--seed", "0",
        "--max-model-len", "2048", "--enforce-eager",
        "--hf-overrides", json.dumps({"max_position_embeddings": 2048}),
        "--structured-outputs-config",
        json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
                pytest.fail(f"vLLM server exited with code {process.returncode}:\n{tail}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not healthy after 600 s; log {log_path}")
            time.sleep(1.0)
        base_url = f"http://127.0.0.1:{port}/v1"
        model = httpx.get(f"{base_url}/models", timeout=10).json()["data"][0]["id"]
        yield base_url, model
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


VLLM_OPTIONS = {"rationale_max_chars": 24, "timeout": 120.0, "retries": 1, "backoff": 0.5}


@pytest.mark.vllm
def test_vllm_pointwise_verdicts_parse_and_are_cached(vllm_judge, tiny_path, tmp_path, monkeypatch):
    base_url, model = vllm_judge
    assert model == tiny_path  # vLLM serves a model under its path (no --served-model-name)
    monkeypatch.setenv(KEY_VAR, KEY)  # vLLM started without --api-key ignores it
    reward = judge_score(
        base_url=base_url, model=model, api_key_env=KEY_VAR, scale=[1, 5],
        reference_column="answer", cache_dir=str(tmp_path), **VLLM_OPTIONS,
    )  # fmt: skip
    prompts, completions = ["12+34=", "7+8=", "9+9="], ["46", "14", "eighteen"]
    answers = ["46", "15", "18"]
    first = reward(prompts=prompts, completions=completions, answer=answers)
    assert reward.judge.stats == {"requests": 3}  # no retry: every answer parsed
    assert all(isinstance(v, Scored) for v in first)
    assert all(v.score in {0.0, 0.25, 0.5, 0.75, 1.0} for v in first)  # integers 1..5
    assert all(isinstance(v.feedback, str) and len(v.feedback) <= 24 for v in first)
    again = reward(prompts=prompts, completions=completions, answer=answers)
    assert again == first
    assert reward.judge.stats == {"requests": 3, "cache_hits": 3}  # zero new requests
    texts = [p.read_text() for p in tmp_path.rglob("*.json")]
    assert len(texts) == 3 and all(KEY not in t for t in texts)
    assert KEY not in repr(reward.judge)


@pytest.mark.vllm
def test_vllm_pairwise_verdicts_parse_in_both_orders(vllm_judge):
    base_url, model = vllm_judge
    judge = pairwise_judge(base_url=base_url, model=model, **VLLM_OPTIONS)
    verdicts = judge.compare(["12+34=", "7+8="], ["46", "15"], ["47", "fifteen"])
    assert judge.stats == {"requests": 4}
    for v in verdicts:
        assert v.raw_ab in {"A", "B", "tie"} and v.raw_ba in {"A", "B", "tie"}
        assert v.winner in {"a", "b", "tie"} and (v.winner == "tie" or v.consistent)
        assert isinstance(v.rationale_ab, str) and len(v.rationale_ba) <= 24
    assert position_consistency(verdicts) in {0.0, 0.5, 1.0}
