"""Read an offline W&B run file (`run-<id>.wandb`) back, for tests.

The file is a LevelDB-style log: a 7-byte header (`:W&B`, magic 0xBEE1, version 0), then 32 KiB
blocks of records, each with a 7-byte header (crc32c, length uint16, type: 1 full, 2 first,
3 middle, 4 last) and a serialised `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


@dataclass
class OfflineRun:
    run_id: str = ""
    group: str = ""
    job_type: str = ""
    name: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def read_records(path: str | Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:
            pos += left_in_block
            continue
        body = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            records.append(body)
        elif kind == 2:
            pending = body
        elif kind == 3:
            pending += body
        elif kind == 4:
            records.append(pending + body)
            pending = b""
    return records


def read_run(path: str | Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    run = OfflineRun()
    for raw in read_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.group, run.job_type, run.name = (
                r.run_id,
                r.run_group,
                r.job_type,
                r.display_name,
            )
            for item in r.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            run.history.append(row)
    return run


def find_runs(root: str | Path) -> list[OfflineRun]:
    return [read_run(p) for p in sorted(Path(root).glob("**/offline-run-*/run-*.wandb"))]
