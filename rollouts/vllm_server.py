"""Rollout engine on a separate OpenAI-compatible vLLM server (`rollout.engine: vllm-server`).

Either posttrain starts the server (a free loopback port, health-checked, in its own process
group, stopped on close, on exit, on Ctrl-C, and by the kernel if the trainer is killed) or it
talks to an existing one at `url`. Weights reach the server after every update without a
restart: the trainer writes them to `weights_dir` (atomically) and asks the server to reload
them in place through vLLM's `/collective_rpc` (`reload_weights`), which needs
`VLLM_SERVER_DEV_MODE=1` on the server and `weights_dir` on a filesystem both can see.

Requests have timeouts and retries. A server that dies is an error naming its exit code and
the end of its log, or is restarted (and given the latest weights) when `restarts` allows.

Test: `pytest -m vllm tests/test_rollouts_vllm_server.py`.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rollouts.types import Group, Sample, SamplingParams
from rollouts.vllm_engine import vllm_on_cpu
from rollouts.weights import export_state_dict

_LIVE: set[VLLMServerEngine] = set()


class ServerError(RuntimeError):
    """The vLLM server failed, died or could not be reached."""


@dataclass(frozen=True)
class ServerOptions:
    url: str | None = None
    """An existing server (`http://host:port`); None starts one on loopback."""
    dtype: str = "float32"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    cpu_kv_cache_gib: int = 1
    seed: int = 0
    startup_timeout: float = 600.0
    """Seconds to wait for a started server to answer /health."""
    request_timeout: float = 300.0
    retries: int = 2
    """Extra attempts for a request that fails with a transport error or a 5xx answer."""
    restarts: int = 0
    """How many times a started server that dies may be restarted (0 = fail)."""
    weights_dir: str | None = None
    """Where weights are written for the server to reload; default a private temp folder."""
    max_concurrency: int = 32
    """Requests in flight at once."""
    prompts_per_request: int = 64
    """Prompts batched into one request when sampling is greedy or unseeded."""


class VLLMServerEngine:
    name = "vllm-server"

    def __init__(self, model_path: str, tokenizer: Any, options: ServerOptions | None = None):
        import httpx

        self.options = options or ServerOptions()
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.version = 0
        self.process: subprocess.Popen | None = None
        self.restarts_left = self.options.restarts
        self._own_weights_dir = self.options.weights_dir is None
        self.weights_dir = Path(
            self.options.weights_dir or tempfile.mkdtemp(prefix="posttrain-weights-")
        )
        self._has_weights = False
        self._epoch = 0  # bumped by every restart
        self._restart_lock = threading.Lock()
        self._http = httpx.Client(timeout=self.options.request_timeout)
        self._log_path = self.weights_dir / "server.log"
        if self.options.url:
            self.url = self.options.url.rstrip("/")
            self._wait_healthy(self.options.startup_timeout)
        else:
            self._start()
        self.served_model = self._get("/v1/models")["data"][0]["id"]

    # -- lifecycle -----------------------------------------------------------------------------

    def _start(self) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        o = self.options
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_path, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", o.dtype, "--seed", str(o.seed),
            "--gpu-memory-utilization", str(o.gpu_memory_utilization),
            "--tensor-parallel-size", str(o.tensor_parallel_size),
        ]  # fmt: skip
        if o.max_model_len:
            cmd += ["--max-model-len", str(o.max_model_len)]
        if vllm_on_cpu():  # seeded requests cannot survive a split prompt there (vllm_engine.py)
            cmd += ["--no-enable-chunked-prefill"]
        env = {
            **os.environ,
            "VLLM_SERVER_DEV_MODE": "1",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get(
                "VLLM_CPU_KVCACHE_SPACE", str(o.cpu_kv_cache_gib)
            ),
        }
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self._log = self._log_path.open("ab")
        self.process = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
        _LIVE.add(self)
        self._wait_healthy(o.startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive("while starting")
            try:
                if self._http.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        raise ServerError(
            f"vLLM server at {self.url} not healthy after {timeout:.0f} s{self._log_tail()}"
        )

    def _check_alive(self, when: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ServerError(
                f"vLLM server (pid {self.process.pid}, {self.url}) exited with code "
                f"{self.process.returncode} {when}{self._log_tail()}"
            )

    def _log_tail(self, lines: int = 15) -> str:
        if not self._log_path.exists():
            return ""
        tail = self._log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"; log {self._log_path}:\n" + "\n".join(tail)

    def close(self) -> None:
        _LIVE.discard(self)
        if self.process is not None:
            _stop_group(self.process)  # also sweeps workers left by a leader that died
            self._log.close()
        self._http.close()
        if self._own_weights_dir:
            shutil.rmtree(self.weights_dir, ignore_errors=True)

    # -- requests ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        import httpx

        for attempt in range(self.options.retries + 1):
            epoch = self._epoch
            try:
                response = self._http.request(method, f"{self.url}{path}", json=body)
                if response.status_code < 500:
                    if response.status_code >= 400:
                        raise ServerError(
                            f"{method} {path}: {response.status_code} {response.text[:500]}"
                        )
                    return response.json() if response.content else None
                problem = f"{response.status_code} {response.text[:200]}"
            except httpx.TransportError as err:
                problem = f"{type(err).__name__}: {err}"
            if self.process is not None and (
                epoch != self._epoch or self.process.poll() is not None
            ):
                self._restart_or_fail(f"during {method} {path}", epoch)
            elif attempt == self.options.retries:
                raise ServerError(
                    f"{method} {self.url}{path} failed {attempt + 1} times: {problem}"
                )
            time.sleep(min(2.0**attempt, 10.0))
        raise ServerError(f"{method} {self.url}{path} failed after restarting the server")

    def _restart_or_fail(self, when: str, epoch: int) -> None:
        """Restart a dead server once, however many concurrent requests saw it die."""
        with self._restart_lock:
            if epoch != self._epoch:
                return  # another request already restarted it
            if self.restarts_left <= 0:
                self._check_alive(when)
            self.restarts_left -= 1
            _stop_group(self.process)
            self._log.close()
            self._start()
            if self._has_weights:
                self._reload()
            self._epoch += 1

    def _get(self, path: str) -> Any:
        return self._request("GET", path)

    def _post(self, path: str, body: dict) -> Any:
        return self._request("POST", path, body)

    def _parallel(self, fn, items: list) -> list:
        workers = max(1, min(self.options.max_concurrency, len(items)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fn, items))

    # -- RolloutEngine -------------------------------------------------------------------------

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingParams, rows: list[dict] | None = None
    ) -> list[Group]:
        rows = rows if rows is not None else [{} for _ in prompts]
        prompt_ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        # A request's seed is shared by all its prompts, which would then draw the same noise:
        # seeded sampling sends one prompt per request; greedy or unseeded sampling batches them.
        seeded = sampling.seed is not None and sampling.temperature > 0
        size = 1 if seeded else self.options.prompts_per_request
        chunks = [list(range(i, min(i + size, len(prompts)))) for i in range(0, len(prompts), size)]

        def one(indices: list[int]) -> list[list[Sample]]:
            body = {
                "model": self.served_model,
                "prompt": [prompt_ids[i] for i in indices],
                "n": n,
                "max_tokens": sampling.max_new_tokens,
                "ignore_eos": sampling.ignore_eos,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "logprobs": 0,
                "return_token_ids": True,
            }
            if seeded:
                body["seed"] = sampling.seed * 1_000_003 + indices[0]
            version = self.version
            choices = sorted(
                self._post("/v1/completions", body)["choices"], key=lambda c: c["index"]
            )
            out = []
            for k, i in enumerate(indices):
                out.append(
                    [
                        Sample(
                            prompts[i],
                            c["text"],
                            prompt_ids[i],
                            list(c["token_ids"]),
                            list(c["logprobs"]["token_logprobs"]),
                            "length" if c["finish_reason"] == "length" else "stop",
                            version,
                        )
                        for c in choices[k * n : (k + 1) * n]
                    ]
                )
            return out

        samples = [group for part in self._parallel(one, chunks) for group in part]
        return [Group(p, s, r) for p, s, r in zip(prompts, samples, rows, strict=True)]

    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        def one(seq: list[int]) -> list[float]:
            body = {
                "model": self.served_model,
                "prompt": seq,
                "max_tokens": 1,
                "prompt_logprobs": 0,
                "temperature": 0,
            }
            steps = self._post("/v1/completions", body)["choices"][0]["prompt_logprobs"]
            return [0.0] + [steps[i][str(tok)]["logprob"] for i, tok in enumerate(seq) if i > 0]

        return self._parallel(one, sequences)

    def load_weights(self, source: Any, version: int) -> None:
        from safetensors.torch import save_file

        staging = self.weights_dir / "model.safetensors.tmp"
        save_file(_checkpoint_tensors(source), str(staging))
        os.replace(staging, self.weights_dir / "model.safetensors")
        self._has_weights = True
        self._reload()
        self.version = version

    def _reload(self) -> None:
        self._post(
            "/collective_rpc",
            {"method": "reload_weights", "kwargs": {"weights_path": str(self.weights_dir)}},
        )
        self._post("/reset_prefix_cache", {})

    def sleep(self) -> None:
        """The server keeps its memory; sleeping a shared server is the operator's call."""


def _checkpoint_tensors(source: Any) -> dict[str, torch.Tensor]:
    """Every state-dict entry as its own CPU tensor, tied ones included.

    safetensors refuses tensors that share memory, and vLLM's in-place reload needs every name:
    leaving out `lm_head.weight` of a tied model left the layers stale (the probe caught it).
    """
    state = export_state_dict(source)  # LoRA policies: merged weights
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        shared = tensor.data_ptr() in seen
        seen.add(tensor.data_ptr())
        out[name] = tensor.clone().cpu() if shared else tensor.contiguous().cpu()
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: get SIGTERM from the kernel when the trainer dies, even by SIGKILL."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=grace)
    deadline = time.monotonic() + grace  # workers take a moment to exit after SIGKILL
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


@atexit.register
def _stop_all() -> None:
    for engine in list(_LIVE):
        engine.close()
