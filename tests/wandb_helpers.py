"""Reading a Weights & Biases offline run back from the file W&B writes (``run-*.wandb``).

The file is a log of protobuf records in W&B's LevelDB-style format: a 7-byte header, then
32 KiB blocks of records, each with a 7-byte header of checksum, length and type, split across
blocks as FIRST/MIDDLE/LAST; the records are parsed with the protobuf classes W&B ships.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7  # the file's (":W&B", magic, version) and each record's (crc, length, type)


def records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        left = BLOCK - offset % BLOCK
        if left < HEADER:  # the block's tail is padding
            offset += left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + HEADER])
        chunk = data[offset + HEADER:offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            out.append(pending)
            pending = b""
    return out


def history(run_dir: Path) -> dict[int, dict[str, object]]:
    """step -> the logged row of the run's one offline W&B run."""
    folder, = run_dir.glob("wandb/offline-run-*")
    return history_of(folder)


def history_of(folder: Path) -> dict[int, dict[str, object]]:
    """step -> the logged row of one offline W&B run folder (nested keys joined by /)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path, = folder.glob("run-*.wandb")
    steps: dict[int, dict[str, object]] = {}
    for data in records(path):
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
               for item in record.history.item}
        steps[int(row["_step"])] = row
    return steps
