"""The vLLM server engine on loopback: start, generate, sync, stop; a server killed mid-rollout."""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from posttrain.models.load import load_policy  # noqa: E402
from posttrain.sync import probe_logprob_diff  # noqa: E402
from rollouts import SamplingParams, create_engine  # noqa: E402
from rollouts.vllm_server import ServerError, ServerOptions, VLLMServerEngine  # noqa: E402

PROMPTS = ["12+34=", "7+8=", "99+99="]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0)


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_free(url: str) -> bool:
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _kill(engine: VLLMServerEngine) -> None:
    os.killpg(engine.process.pid, signal.SIGKILL)
    engine.process.wait(timeout=30)


def test_start_generate_sync_stop(tiny_path, tmp_path):
    model, tokenizer = load_policy(tiny_path, "float32", "cpu")
    engine = VLLMServerEngine(tiny_path, tokenizer, ServerOptions(retries=0))
    pid, url = engine.process.pid, engine.url
    try:
        assert url.startswith("http://127.0.0.1:")
        groups = engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=6, seed=2))
        assert [len(g.samples) for g in groups] == [4, 4, 4]
        samples = [s for g in groups for s in g.samples]
        assert all(len(s.logprobs) == len(s.completion_ids) <= 6 for s in samples)
        sequences = [s.prompt_ids + s.completion_ids for s in samples]
        assert probe_logprob_diff(engine, model, sequences, tokenizer.pad_token_id) < 1e-4

        before = [g.samples[0].completion_ids for g in engine.generate(PROMPTS, 1, GREEDY)]
        # Greedy prompts travel in one batched request; answers must come back in order.
        hf = create_engine("hf", model=model, tokenizer=tokenizer)
        assert before == [g.samples[0].completion_ids for g in hf.generate(PROMPTS, 1, GREEDY)]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        engine.load_weights(model, version=3)
        after = engine.generate(PROMPTS, 1, GREEDY)
        assert [g.samples[0].completion_ids for g in after] != before
        assert {g.samples[0].policy_version for g in after} == {3}
        assert engine.process.pid == pid  # synced without a restart
        sequences = [s.prompt_ids + s.completion_ids for g in after for s in g.samples]
        assert probe_logprob_diff(engine, model, sequences, tokenizer.pad_token_id) < 1e-4
        # The tied embedding alone must reach the server too.
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(-1.0)
        engine.load_weights(model, version=4)
        assert probe_logprob_diff(engine, model, sequences, tokenizer.pad_token_id) < 1e-4

        # An existing server by URL: used as is, synced through a folder of our choosing.
        existing = VLLMServerEngine(
            tiny_path, tokenizer, ServerOptions(url=url, weights_dir=str(tmp_path))
        )
        assert existing.process is None
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(-1.0)
        existing.load_weights(model, version=5)
        assert (tmp_path / "model.safetensors").is_file()
        assert probe_logprob_diff(existing, model, sequences, tokenizer.pad_token_id) < 1e-4
        existing.close()
        assert _group_alive(pid)  # closing a client of an existing server leaves it running
    finally:
        engine.close()
    assert not _group_alive(pid), "the server's process group outlived close()"
    assert _port_free(url)


def test_server_killed_mid_rollout_is_a_clear_error_or_restarted(tiny_path):
    model, tokenizer = load_policy(tiny_path, "float32", "cpu")
    engine = VLLMServerEngine(tiny_path, tokenizer, ServerOptions(retries=1, restarts=1))
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        engine.load_weights(model, version=1)
        expected = [g.samples[0].completion_ids for g in engine.generate(PROMPTS, 1, GREEDY)]
        first_pid = engine.process.pid

        # Killed before a request: restarted once, with the latest weights reloaded.
        _kill(engine)
        again = engine.generate(PROMPTS, 1, GREEDY)
        assert engine.process.pid != first_pid
        assert [g.samples[0].completion_ids for g in again] == expected
        assert not _group_alive(first_pid)

        # Killed while a large rollout is in flight, with no restarts left: a clear error.
        timer = threading.Timer(1.0, _kill, args=(engine,))
        timer.start()
        with pytest.raises(
            ServerError, match=r"vLLM server \(pid \d+, http://127.0.0.1:\d+\) exited with code"
        ):
            engine.generate(PROMPTS * 40, 8, SamplingParams(max_new_tokens=200, seed=0))
        timer.join()
    finally:
        engine.close()
    assert not _group_alive(engine.process.pid)


CHILD = """
import sys, time
from transformers import AutoTokenizer
from rollouts.vllm_server import VLLMServerEngine
engine = VLLMServerEngine(sys.argv[1], AutoTokenizer.from_pretrained(sys.argv[1]))
print(engine.process.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_no_orphan_server_when_the_trainer_is_interrupted_or_killed(tiny_path, signum):
    import subprocess
    import sys
    import time

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, tiny_path], stdout=subprocess.PIPE, text=True
    )
    server_pid = int(child.stdout.readline())
    assert _group_alive(server_pid)
    child.send_signal(signum)
    child.wait(timeout=60)
    deadline = time.monotonic() + 60
    while _group_alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _group_alive(server_pid), f"server group {server_pid} outlived its trainer"
