"""Log files: their last lines (read from the end, so a large log costs no more than its tail), and following them."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

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


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def clean_line(line: str) -> str:
    """A log line as a person reads it: no colour codes, and of a line redrawn with \\r only what was left."""
    line = _ANSI.sub("", line)
    if "\r" in line:
        parts = [p for p in line.split("\r") if p]
        line = parts[-1] if parts else ""
    return line


class LogFollower:
    """The lines appended to some files from the moment it is made (a file may appear later), as they come."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._offsets = {path: _size(path) for path in self.paths}
        self._partial = {path: b"" for path in self.paths}
        self.ended: Literal["done", "max_s", "write_timeout"] | None = None
        """Why follow() ended, once it has."""

    def read(self) -> list[str]:
        """The complete lines written since the last read, file by file."""
        out: list[str] = []
        for path in self.paths:
            size = _size(path)
            if size < self._offsets[path]:  # truncated or rotated: read it again from its start
                self._offsets[path], self._partial[path] = 0, b""
            if size == self._offsets[path]:
                continue
            with path.open("rb") as handle:
                handle.seek(self._offsets[path])
                data = self._partial[path] + handle.read(size - self._offsets[path])
            self._offsets[path] = size
            *lines, self._partial[path] = data.split(b"\n")
            out += [clean_line(line.decode("utf-8", "replace")) for line in lines]
        return out

    def rest(self) -> list[str]:
        """What is left at the end: the unfinished last line of each file."""
        out = [clean_line(self._partial[p].decode("utf-8", "replace")) for p in self.paths if self._partial[p]]
        self._partial = {path: b"" for path in self.paths}
        return out

    def follow(
        self,
        *,
        done: Callable[[], bool],
        max_s: float,
        write_timeout_s: float | None = None,
        poll_s: float = 0.5,
        check_every_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Iterator[str]:
        """Each new line (with its newline) as it comes, until done() (asked at most every check_every_s; what
        was written before is still read), until max_s have passed, or until the consumer took longer than
        write_timeout_s to take one line (a server writes each one before it asks for the next: a client that
        reads too slowly would hold the server's thread). `ended` then says which: done, max_s or write_timeout."""
        started = checked = clock()
        self.ended = None
        while True:
            for line in self.read():
                handed = clock()
                yield line + "\n"
                if write_timeout_s is not None and clock() - handed > write_timeout_s:
                    self.ended = "write_timeout"
                    return
            now = clock()
            if now - started >= max_s:
                self.ended = "max_s"
                return
            if now - checked >= check_every_s:
                checked = now
                if done():
                    for line in [*self.read(), *self.rest()]:
                        yield line + "\n"
                    self.ended = "done"
                    return
            sleep(poll_s)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
