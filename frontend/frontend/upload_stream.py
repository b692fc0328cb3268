"""A multipart/form-data request body that is read in chunks, so an upload passes through without
being held in memory (requests' own `files=` reads the whole file first)."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator, Mapping
from typing import IO

CHUNK = 1 << 16


def size_of(stream: IO[bytes]) -> int:
    """The size of a seekable stream (werkzeug spools every uploaded file to one), which is rewound."""
    stream.seek(0, io.SEEK_END)
    size = stream.tell()
    stream.seek(0)
    return size


def _quote(value: str) -> str:
    # What browsers do with a name in Content-Disposition (HTML spec, multipart/form-data encoding).
    return value.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


class MultipartStream:
    """Text fields, then one file streamed from `stream`; knows its length so no chunked encoding is needed."""

    def __init__(
        self,
        fields: Mapping[str, str],
        file_field: str,
        filename: str,
        stream: IO[bytes],
        size: int,
        content_type: str = "application/octet-stream",
    ) -> None:
        self.boundary = secrets.token_hex(16)
        dash = f"--{self.boundary}\r\n".encode()
        head = io.BytesIO()
        for name, value in fields.items():
            head.write(dash)
            head.write(f'Content-Disposition: form-data; name="{_quote(name)}"\r\n\r\n'.encode())
            head.write(value.encode())
            head.write(b"\r\n")
        head.write(dash)
        head.write(
            f'Content-Disposition: form-data; name="{_quote(file_field)}"; filename="{_quote(filename)}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n".encode()
        )
        tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._head, self._tail = head.getvalue(), tail
        self._parts: list[tuple[IO[bytes], int]] = [
            (io.BytesIO(self._head), len(self._head)),
            (stream, size),
            (io.BytesIO(tail), len(tail)),
        ]
        self._length = len(self._head) + size + len(tail)
        self._left = [n for _, n in self._parts]

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (everything left when size is negative), b"" at the end."""
        want = sum(self._left) if size is None or size < 0 else size
        out = bytearray()
        for i, (part, _) in enumerate(self._parts):
            while self._left[i] > 0 and len(out) < want:
                data = part.read(min(want - len(out), self._left[i]))
                if not data:
                    raise OSError("the upload ended before its announced size")
                out += data
                self._left[i] -= len(data)
            if len(out) >= want:
                break
        return bytes(out)

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk
