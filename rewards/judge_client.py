"""Client for an LLM judge behind any OpenAI-compatible chat-completions endpoint.

Each request asks for structured output (`response_format` of type `json_schema`, the OpenAI
format, which vLLM's server enforces with a grammar), so the answer parses even from a weak
model; it is also validated here, since not every endpoint enforces every schema keyword.

- The API key is read from the environment variable named by `api_key_env` at request time.
  It is never stored on an object, in a cache file, in a config or in an error message.
- At most `max_concurrent` requests are in flight per client, whichever threads send them.
- Connect errors, timeouts, HTTP 429 and 5xx, and answers that do not parse or fail validation
  are retried `retries` times with exponential backoff (`backoff * 2**k` seconds, at least
  what a `Retry-After` header asks). Other 4xx answers are not retried: they fail at once with
  the server's message.
- Verdicts are cached on disk when a cache folder is given (see `rewards.judge_cache`).

A small judge served by vLLM may pad JSON with whitespace until it runs out of tokens; start the
server with `--structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace":
true}'` to forbid that.

Test: `pytest tests/test_judge.py`.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewards.judge_cache import VerdictCache, request_key

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_BACKOFF = 60.0


class JudgeError(RuntimeError):
    """A judge request failed: the endpoint, what went wrong, and after how many attempts."""


class JudgeConfigError(JudgeError):
    """A failure that no other request would escape (missing key, 401, 403, 404)."""


@dataclass(frozen=True)
class JudgeEndpoint:
    """Where and how to ask the judge. Holds the NAME of the key's variable, never the key."""

    base_url: str
    """Up to the version prefix, e.g. `http://127.0.0.1:8000/v1` (requests go to
    `{base_url}/chat/completions`)."""
    model: str
    """Model id the endpoint serves (vLLM: the model path unless `--served-model-name`)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key; None sends no Authorization."""
    timeout: float = 60.0
    """Seconds an attempt may wait to connect, or for the answer."""
    retries: int = 3
    """Extra attempts after a retryable failure."""
    backoff: float = 1.0
    """Seconds before the first retry; doubled for each further one."""
    max_concurrent: int = 8
    """Requests in flight at once."""
    temperature: float = 0.0
    max_tokens: int | None = None
    """Tokens the judge may write; None leaves it to each request (the judges allow enough
    for their longest rationale)."""
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    """Further request fields, merged into the body (e.g. `{"seed": 0}`)."""

    def __post_init__(self) -> None:
        if not re.match(r"https?://", self.base_url or ""):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("model must name the model the endpoint serves, got an empty value")
        if self.api_key_env is not None and not _ENV_NAME.fullmatch(self.api_key_env):
            # The value may be a key pasted by mistake: do not echo it.
            raise ValueError(
                "api_key_env must be the NAME of an environment variable holding the key "
                "(letters, digits, underscores), not the key itself"
            )
        checks = {
            "timeout": self.timeout > 0,
            "retries": self.retries >= 0,
            "backoff": self.backoff >= 0,
            "max_concurrent": self.max_concurrent >= 1,
            "temperature": self.temperature >= 0,
            "max_tokens": self.max_tokens is None or self.max_tokens >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} is out of range: {getattr(self, name)!r}")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        object.__setattr__(self, "extra_body", dict(self.extra_body))

    def headers(self) -> dict[str, str]:
        """Request headers, with the key read from the environment now."""
        if self.api_key_env is None:
            return {}
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeConfigError(
                f"the judge's API key variable {self.api_key_env} is not set (or empty); "
                f"export {self.api_key_env}=<key> or set api_key_env to another variable"
            )
        return {"Authorization": f"Bearer {key}"}


@dataclass(frozen=True)
class JudgeRequest:
    """One question to the judge and how to check its answer."""

    messages: list[dict[str, str]]
    schema_name: str
    schema: dict[str, Any]
    validate: Callable[[Any], dict[str, Any]]
    """Parsed JSON -> the verdict; raises ValueError saying what is wrong."""
    max_tokens: int = 1024
    """Used when the endpoint does not set `max_tokens`."""


@dataclass(frozen=True)
class _Retryable:
    problem: str
    wait: float = 0.0
    """Seconds the server asked for (Retry-After)."""


class JudgeClient:
    """Sends `JudgeRequest`s to one endpoint, concurrently, with retries and a cache."""

    def __init__(self, endpoint: JudgeEndpoint, cache_dir: str | Path | None = None) -> None:
        self.endpoint = endpoint
        self.cache = VerdictCache(cache_dir) if cache_dir is not None else None
        self._slots = threading.BoundedSemaphore(endpoint.max_concurrent)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._http: Any = None

    def __repr__(self) -> str:
        return f"JudgeClient({self.endpoint!r}, cache={self.cache and self.cache.directory})"

    @property
    def stats(self) -> dict[str, int]:
        """Counts so far: requests (HTTP attempts), cache_hits, retries, invalid_answers."""
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def ask_all(self, requests: list[JudgeRequest]) -> list[dict[str, Any] | JudgeError]:
        """Each request's verdict, or the JudgeError that ended it.

        Runs up to `max_concurrent` at a time; raises the first `JudgeConfigError`, which
        would fail every request alike.
        """
        self.endpoint.headers()  # a missing key fails before any request
        if not requests:
            return []
        workers = min(self.endpoint.max_concurrent, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
            results = list(pool.map(self._ask_or_error, requests))
        for result in results:
            if isinstance(result, JudgeConfigError):
                raise result
        return results

    def ask(self, request: JudgeRequest) -> dict[str, Any]:
        """One request's verdict; raises JudgeError when it cannot be had."""
        return self._ask(request)

    # -- one request ---------------------------------------------------------------------------

    def _ask_or_error(self, request: JudgeRequest) -> dict[str, Any] | JudgeError:
        try:
            return self._ask(request)
        except JudgeError as err:
            return err

    def _ask(self, request: JudgeRequest) -> dict[str, Any]:
        e = self.endpoint
        body = {
            "model": e.model,
            "messages": request.messages,
            "temperature": e.temperature,
            "max_tokens": e.max_tokens or request.max_tokens,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": request.schema_name,
                    "schema": request.schema,
                    "strict": True,  # OpenAI enforces a schema only in strict mode
                },
            },
            **e.extra_body,
        }
        key = request_key(body)
        if self.cache is not None and (entry := self.cache.get(key)) is not None:
            try:
                verdict = request.validate(entry.get("verdict"))
            except ValueError:
                pass  # unusable entry: ask again and overwrite it
            else:
                self._count("cache_hits")
                return verdict
        failed = _Retryable("")
        for attempt in range(e.retries + 1):
            if attempt:
                self._count("retries")
                delay = e.backoff * 2 ** (attempt - 1) * (1 + 0.1 * random.random())
                time.sleep(min(max(delay, failed.wait), MAX_BACKOFF))
            outcome = self._attempt(body, request.validate)
            if isinstance(outcome, _Retryable):
                failed = outcome
                continue
            content, verdict = outcome
            if self.cache is not None:
                self.cache.put(key, {"model": e.model, "verdict": verdict, "content": content})
            return verdict
        raise JudgeError(
            f"judge {e.model!r} at {e.base_url}: {e.retries + 1} attempt(s) failed; "
            f"last: {failed.problem}"
        )

    def _attempt(self, body: dict, validate: Callable) -> tuple[str, dict] | _Retryable:
        """(content, verdict), or a retryable problem; raises a non-retryable one."""
        import httpx

        e = self.endpoint
        url = f"{e.base_url}/chat/completions"
        self._count("requests")
        try:
            with self._slots:
                response = self._client().post(url, json=body, headers=e.headers())
        except httpx.TimeoutException:
            return _Retryable(f"no answer within timeout={e.timeout} s")
        except httpx.TransportError as err:
            return _Retryable(f"{type(err).__name__}: {err}")
        status = response.status_code
        if status == 429 or status >= 500:
            asked = response.headers.get("retry-after", "")
            wait = float(asked) if re.fullmatch(r"\d+(\.\d*)?", asked) else 0.0
            return _Retryable(f"HTTP {status}: {_error_message(response)}", wait)
        if status >= 400:
            kind = JudgeConfigError if status in (401, 403, 404) else JudgeError
            message = _error_message(response)
            raise kind(f"judge {e.model!r} at {url} answered HTTP {status}: {message}")
        try:
            content = _content(response, body["max_tokens"])
            return content, validate(json.loads(content))
        except ValueError as err:
            self._count("invalid_answers")
            return _Retryable(f"unusable answer: {err}")

    def _client(self) -> Any:
        import httpx

        with self._lock:
            if self._http is None:
                n = self.endpoint.max_concurrent
                self._http = httpx.Client(
                    timeout=self.endpoint.timeout,
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                )
            return self._http

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1


def raise_first(results: list[Any], per_sample: int = 1) -> list[Any]:
    """`results` unchanged, unless one is a JudgeError: that is raised, naming its sample."""
    for i, value in enumerate(results):
        if isinstance(value, JudgeError):
            raise type(value)(f"sample {i // per_sample}: {value}") from value
    return results


def _content(response: Any, max_tokens: int) -> str:
    """The message text of a chat-completions answer; ValueError if there is none."""
    try:
        choice = response.json()["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise ValueError(
            f"not a chat-completions answer ({err!r}): {response.text[:200]!r}"
        ) from err
    if choice.get("finish_reason") == "length":
        raise ValueError(
            f"the answer was cut at max_tokens={max_tokens}: {str(content)[:120]!r}; "
            "raise max_tokens or shorten the rationale"
        )
    if not isinstance(content, str):
        refusal = choice["message"].get("refusal")
        raise ValueError(f"no message content (refusal: {refusal!r})")
    return content


def _error_message(response: Any) -> str:
    """The `error.message` of an OpenAI-style error body, else the start of the body."""
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        if isinstance(error, str):
            return error[:500]
    except (ValueError, AttributeError):
        pass
    return response.text[:500]


def open_endpoint(
    *, extra_body: Mapping[str, Any] | None = None, check: bool = True, **options: Any
) -> JudgeEndpoint:
    """A `JudgeEndpoint` from config options, checked at start-up: the key variable is set
    and, with `check`, the server answers (see `check_reachable`)."""
    endpoint = JudgeEndpoint(extra_body=extra_body or {}, **options)
    endpoint.headers()
    if check:
        check_reachable(endpoint)
    return endpoint


def check_reachable(endpoint: JudgeEndpoint) -> None:
    """Fail at start-up, not at the first scoring call, when the judge cannot be reached."""
    import httpx

    url = endpoint.base_url.rstrip("/") + "/models"
    try:
        response = httpx.get(url, headers=endpoint.headers(), timeout=min(endpoint.timeout, 10.0))
    except httpx.HTTPError as err:
        raise ValueError(
            f"judge endpoint {endpoint.base_url} is unreachable ({type(err).__name__}: {err}); "
            "start the server or fix base_url"
        ) from None
    if response.status_code in (401, 403):
        raise ValueError(f"judge endpoint {url} refused the API key (HTTP {response.status_code})")
    if response.status_code != 200:
        return  # some OpenAI-compatible servers do not list models; the endpoint answered
    try:
        served = [m.get("id") for m in response.json().get("data", [])]
    except (ValueError, AttributeError):
        return
    if served and endpoint.model not in served:
        raise ValueError(
            f"judge endpoint {endpoint.base_url} does not serve model {endpoint.model!r}; "
            f"it serves {served[:10]}"
        )
