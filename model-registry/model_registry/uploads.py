"""Receiving an upload: each multipart file is spooled to a private temp file as it arrives, counted and hashed.

Flask's form parser asks the request class for a stream per uploaded file; `SpoolingRequest` hands it a
`SpooledFile` in the model store's `.tmp` (same filesystem as the versions, so publishing is a rename). The file is
never held in memory, a file over the cap stops the parse with a 413, a full store stops it with a 507, and every
spooled file is removed when the request ends unless it was published.

The upload route is streamed: its signature may leave the body unsigned (UNSIGNED-PAYLOAD), so a caller can send a
zip as it reads it. A caller that did sign the body's hash has it checked here, once the body is read and before
anything is published; a body other than the one signed is a 401 `bad_signature`.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import IO, cast

from flask import Flask, Request, current_app, request

from miaas import identity
from miaas.errors import BadRequest, PayloadTooLarge, Unauthorized
from model_registry.registry import ReceivedZip
from model_registry.storage import ModelStorage, remove, space_checked

SPOOL = "model_registry.spool"
FORM_OVERHEAD = 1 << 20
BLOCK = 4 << 20  # multipart boundaries, part headers and the small fields around the zip


class SpooledFile:
    """A file being received: written straight to disk, counted against the cap and hashed on the way.

    The form parser writes small pieces; they are gathered into `BLOCK`-sized blocks, and each block's sha256 runs
    on a helper thread while the next one is received and written (hashing and writing both release the GIL).
    """

    def __init__(self, path: Path, file: IO[bytes], max_bytes: int, store_root: Path | None = None) -> None:
        self.path = path
        self.store_root = store_root or path.parent
        self.max_bytes = max_bytes
        self.size_bytes = 0
        self.published = False
        self._file = file
        self._sha256 = hashlib.sha256()
        self._block = bytearray()
        self._hasher: ThreadPoolExecutor | None = None
        self._hashing: Future[None] | None = None

    def write(self, data: bytes) -> int:
        self.size_bytes += len(data)
        if self.size_bytes > self.max_bytes:
            raise too_large(self.max_bytes)
        self._block += data
        if len(self._block) >= BLOCK:
            self._write_block()
        return len(data)

    def _write_block(self) -> None:
        block, self._block = bytes(self._block), bytearray()
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload-sha256")
        if self._hashing is not None:
            self._hashing.result()
        self._hashing = self._hasher.submit(self._sha256.update, block)
        with space_checked(self.store_root):
            self._file.write(block)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.flush()
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell() + len(self._block)

    def read(self, size: int = -1) -> bytes:
        self.flush()
        return self._file.read(size)

    def readline(self, size: int = -1) -> bytes:
        self.flush()
        return self._file.readline(size)

    def flush(self) -> None:
        if self._block:
            self._write_block()
        with space_checked(self.store_root):
            self._file.flush()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        try:
            with space_checked(self.store_root):
                try:
                    if not self._file.closed:
                        self.flush()
                finally:
                    self._file.close()  # flushes what is buffered: may fail on a full store as well
        finally:
            if self._hasher is not None:
                self._hasher.shutdown(wait=True)

    def received(self) -> ReceivedZip:
        """The complete upload, closed."""
        self.close()
        if self._hashing is not None:
            self._hashing.result()
        return ReceivedZip(self.path, self.size_bytes, self._sha256.hexdigest())

    def discard(self) -> None:
        """Close, and remove the file unless it was published. What was not written yet is dropped (writing it could
        fail again on a full store, and the file is going anyway)."""
        try:
            if not self.published:
                self._block = bytearray()
                with suppress(OSError):
                    self._file.close()  # may flush a last buffered piece: on a full store that fails
            self.close()
        finally:
            if not self.published:
                remove(self.path)


class Spool:
    """Where a request's files go: the store's temp folder, at most `max_bytes` each."""

    def __init__(self, storage: ModelStorage, max_bytes: int) -> None:
        self.storage = storage
        self.max_bytes = max_bytes

    def open(self) -> SpooledFile:
        with space_checked(self.storage.root):
            path, file = self.storage.spool()
        return SpooledFile(path, file, self.max_bytes, self.storage.root)


class HashingStream:
    """The request body as the form parser reads it, hashed on the way, to compare with the hash that was signed."""

    def __init__(self, stream: IO[bytes], signed: str) -> None:
        self._stream = stream
        self.signed = signed
        self._sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._sha256.update(data)
        return data

    def check(self) -> None:
        """Read what the parser left (an epilogue after the last part), then refuse a body that is not the one
        signed."""
        while self.read(BLOCK):
            pass
        if self._sha256.hexdigest() != self.signed:
            raise Unauthorized(f"request refused ({identity.BAD_SIGNATURE}): the body is not the one signed",
                               code="unauthenticated", details={"reason": identity.BAD_SIGNATURE})


class SpoolingRequest(Request):
    """A Flask request whose uploaded files are spooled by the app's `Spool` and whose signed body hash, if the
    caller signed one, is checked as the body is parsed."""

    @property
    def spooled_files(self) -> list[SpooledFile]:
        return cast(list[SpooledFile], self.__dict__.setdefault("_spooled_files", []))

    @property
    def signed_body(self) -> HashingStream | None:
        return cast(HashingStream | None, self.__dict__.get("_signed_body"))

    def _get_stream_for_parsing(self) -> IO[bytes]:
        stream = super()._get_stream_for_parsing()
        if getattr(self, "_cached_data", None) is not None:
            return stream  # read whole before (a route whose body is signed): its hash was checked then
        header = self.headers.get(identity.SIGNATURE_HEADER)
        if not header:
            return stream  # a public route: nothing was signed
        signed = identity.parse_signature_header(header).body
        if signed == identity.UNSIGNED_PAYLOAD:
            return stream
        hashing = HashingStream(stream, signed)
        self.__dict__["_signed_body"] = hashing
        return cast(IO[bytes], hashing)

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        spooled = cast(Spool, current_app.extensions[SPOOL]).open()
        self.spooled_files.append(spooled)
        return cast(IO[bytes], spooled)


def install_spool(app: Flask, spool: Spool) -> None:
    """Spool this app's uploads with `spool`, and remove what a request spooled when it ends."""
    app.request_class = SpoolingRequest
    app.extensions[SPOOL] = spool

    @app.teardown_request
    def _discard_spooled(_exc: BaseException | None) -> None:
        for spooled in getattr(request, "spooled_files", []):
            spooled.discard()


def receive_upload(max_bytes: int) -> tuple[str, SpooledFile]:
    """The model name and the spooled zip of this multipart request; 400 or 413 otherwise."""
    if request.mimetype != "multipart/form-data":
        raise BadRequest("send multipart/form-data with a 'model_name' field and the zip as a 'file' field",
                         code="invalid_upload")
    if request.content_length is not None and request.content_length > max_bytes + FORM_OVERHEAD:
        raise too_large(max_bytes)
    upload = request.files.get("file")  # parses the body, spooling each file as it arrives
    signed = cast(SpoolingRequest, request).signed_body
    if signed is not None:
        signed.check()  # before any answer about the content: what was not signed is not looked at
    names = {v.strip() for key in ("model_name", "name") for v in request.form.getlist(key)}
    if not names or names == {""}:
        raise BadRequest("model_name is required", code="invalid_upload")
    if len(names) > 1:
        raise BadRequest(f"model_name and name disagree: {sorted(names)}", code="invalid_upload")
    if upload is None or not isinstance(upload.stream, SpooledFile):
        raise BadRequest("file is required: the model zip as a multipart file field named 'file'",
                         code="invalid_upload")
    return names.pop(), upload.stream


def too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the upload is over the limit of {max_bytes} bytes", details={"max_bytes": max_bytes})
