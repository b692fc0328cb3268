"""The last lines of a log file, read from its end so a large log costs no more than its tail."""

from __future__ import annotations

import os
from pathlib import Path

_BLOCK = 64 * 1024
MAX_TAIL_BYTES = 4 * 1024 * 1024


def tail_lines(path: Path, count: int, *, max_bytes: int = MAX_TAIL_BYTES) -> list[str]:
    """Up to `count` last lines of the file (none when it does not exist), reading at most max_bytes."""
    if count <= 0:
        return []
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return []
    with handle:
        end = handle.seek(0, os.SEEK_END)
        data = b""
        pos = end
        while pos > 0 and data.count(b"\n") <= count and end - pos < max_bytes:
            step = min(_BLOCK, pos)
            pos -= step
            handle.seek(pos)
            data = handle.read(step) + data
    lines = data.decode("utf-8", "replace").splitlines()
    if pos > 0 and lines:
        lines = lines[1:]  # the first line read is probably cut
    return lines[-count:]
