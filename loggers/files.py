"""Writing files so that a reader never sees a half-written one.

Every writer here writes to a temporary name in the target's directory and then renames it
over the target, which is atomic on POSIX file systems.
"""

import io
import json
import os
from pathlib import Path
from typing import Any

import torch


def write_bytes_atomic(path: str | Path, content: bytes) -> None:
    """Write `content` to `path` via a temporary file and a rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, content: Any) -> None:
    write_bytes_atomic(path, (json.dumps(content, indent=2, default=str) + "\n").encode())


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    lines = "".join(json.dumps(record, default=str) + "\n" for record in records)
    write_bytes_atomic(path, lines.encode())


def save_torch_atomic(path: str | Path, state: dict) -> None:
    """`torch.save` a dict of tensors and plain Python values, via a temporary file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getvalue())
