"""Read back what W&B wrote in offline mode: the history rows of `<dir>/wandb/offline-run-*/run-<id>.wandb`.

A .wandb file is a 7-byte header (":W&B", 2-byte key, version) then LevelDB-log records in 32 KiB blocks:
4-byte CRC, 2-byte little-endian length, 1-byte type (1 full, 2 first, 3 middle, 4 last), each holding (part
of) a serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

BLOCK, HEADER = 32768, 7


def _payloads(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a .wandb file")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            yield pending
            pending = b""


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def history(run_dir: Path) -> dict[int, dict[str, object]]:
    """step -> {key: value} over every offline segment of the run (later segments win, as on sync)."""
    from wandb.proto import wandb_internal_pb2

    rows: dict[int, dict[str, object]] = {}
    for path in offline_runs(run_dir):
        for payload in _payloads(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") != "history":
                continue
            items = [([item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
                     for item in record.history.item]
            step = next((value for path, value in items if path == ["_step"]), record.history.step.num)
            row = rows.setdefault(int(step), {})
            for path, value in items:
                if path[0].startswith("_"):  # W&B's own _step, _runtime, _timestamp
                    continue
                if len(path) == 1:
                    row[path[0]] = value
                else:  # a media value (an image) arrives as one item per field: [key, field]
                    row.setdefault(path[0], {})["/".join(path[1:])] = value
    return rows


def run_ids(run_dir: Path) -> set[str]:
    return {path.stem.removeprefix("run-") for path in offline_runs(run_dir)}
