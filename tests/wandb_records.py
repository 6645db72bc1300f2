"""Read the history rows of an offline W&B run file (.wandb), to check what a run really logged.

The file is W&B's transaction log: a 7-byte header, then LevelDB-log framed protobuf `Record`s.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def _records(run_file: Path):
    for payload in _payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record.WhichOneof("record_type"), record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def history_rows(run_file: Path) -> list[dict]:
    return [_items(record.history.item) for kind, record in _records(run_file) if kind == "history"]


def run_summary(run_file: Path) -> dict:
    """The run's identity (id, name, group, job type, tags), config (top-level keys), summary and exit code."""
    info = {"config": {}, "summary": {}}
    for kind, record in _records(run_file):
        if kind == "run":
            run = record.run
            info.update(id=run.run_id, name=run.display_name, group=run.run_group, job_type=run.job_type)
            info["tags"] = list(run.tags)
        elif kind == "config":
            info["config"].update(_items(record.config.update))
        elif kind == "summary":
            info["summary"].update(_items(record.summary.update))
        elif kind == "exit":
            info["exit_code"] = record.exit.exit_code
    return info
