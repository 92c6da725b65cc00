"""On-disk cache of LLM-judge verdicts: one JSON file per request.

The key is the SHA-256 of the request as the judge model sees it (model, messages, output
schema, temperature, max_tokens and any extra body fields), never of the endpoint's address or
API key, so the same question to the same model is asked once across runs and processes.
Files are written to a temporary name in the same folder and moved into place with
`os.replace`, which is atomic: concurrent writers of one key leave one whole file, and a reader
never sees half of one. An unreadable file (edited by hand, say) is a miss and is rewritten.

Test: `pytest tests/test_judge.py -k cache`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def request_key(request: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of `request` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class VerdictCache:
    """JSON files `<dir>/<key[:2]>/<key>.json`, each holding one parsed verdict."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry stored under `key`, or None when there is none or it cannot be read."""
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) else None

    def put(self, key: str, entry: Mapping[str, Any]) -> None:
        """Store `entry` under `key` atomically (temp file in the same folder + os.replace)."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=f".{key[:16]}-", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, ensure_ascii=False, sort_keys=True)
            os.replace(staging, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*/*.json"))
