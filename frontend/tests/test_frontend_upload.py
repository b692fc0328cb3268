"""Uploads pass through the portal to the model registry as a stream, and refusals show per file."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import requests
from flask import Flask
from werkzeug.formparser import parse_form_data

from frontend.upload_stream import CHUNK, MultipartStream, size_of
from miaas.serve import Server


def test_the_zip_reaches_the_registry_byte_for_byte(admin: Any, registry: Any) -> None:
    package = os.urandom(3 * CHUNK + 123)  # larger than werkzeug keeps in memory: it is spooled to disk
    answer = admin.post("/upload", {"model_name": "iris", "file": (io.BytesIO(package), "iris.zip")}, page="/upload")
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/models/m-iris"
    [got] = registry.received
    assert got.form == {"model_name": "iris"}
    assert got.files == {"file": ("iris.zip", package)}
    assert got.user == "admin"
    assert got.signer is not None and got.signer.role == "frontend"  # streamed, signed as UNSIGNED-PAYLOAD
    assert not got.chunked and got.content_length is not None and got.content_length > len(package)
    page = admin.get("/models/m-iris").text
    assert "Uploaded iris version 1." in page
    assert "no webapp.py: only the API runs" in page


def test_a_refused_upload_shows_each_problem_by_file(admin: Any, registry: Any) -> None:
    registry.refuse(400, "invalid_package", "the package is not valid", [
        {"file": "meta.json", "message": "start_commands is required"},
        {"file": "../evil.py", "message": "path escapes the package"},
    ])
    answer = admin.post("/upload", {"model_name": "iris", "file": (io.BytesIO(b"PK"), "iris.zip")}, page="/upload")
    assert answer.status_code == 400
    assert "the package is not valid" in answer.text
    problems = answer.text.split("What the registry refused", 1)[1]
    assert "<strong><code>meta.json</code></strong>\n      <ul><li>start_commands is required</li></ul>" in problems
    assert "<strong><code>../evil.py</code></strong>\n      <ul><li>path escapes the package</li></ul>" in problems
    assert 'value="iris"' in answer.text  # the form keeps the name


def test_an_upload_without_a_name_or_file_is_not_forwarded(admin: Any, registry: Any) -> None:
    answer = admin.post("/upload", {"model_name": " "}, page="/upload")
    assert answer.status_code == 400
    assert "Give the model a name and choose a zip file." in answer.text
    assert registry.received == []


def test_an_upload_over_the_limit_is_refused_with_a_page(
    make_portal: Callable[..., Flask], locate: Any, settings: Any, registry: Any
) -> None:
    c = make_portal(locate, max_upload_bytes=1000).test_client()
    token = _csrf(c.get("/login").text)
    c.post("/login", data={"username": "admin", "password": settings.admin_password.get_secret_value(),
                           "csrf_token": token})
    body, content_type = _multipart({"csrf_token": _csrf(c.get("/upload").text), "model_name": "big"}, 2 << 20)
    answer = c.post("/upload", data=body, content_type=content_type)
    assert answer.status_code == 413
    assert "up to 1000 bytes" in answer.text
    assert registry.received == []


def test_only_a_logged_in_user_may_send_a_large_body(browser: Any, registry: Any) -> None:
    body, content_type = _multipart({"csrf_token": browser.csrf(), "model_name": "big"}, 1 << 20)
    upload = browser.client.post("/upload", data=body, content_type=content_type)
    assert upload.status_code == 302
    assert upload.headers["Location"] == "/login"
    login = browser.client.post("/login", data=body, content_type=content_type)
    assert login.status_code == 413
    assert "Traceback" not in login.text
    assert registry.received == []


def test_uploads_stream_through_a_real_portal_server(
    make_portal: Callable[..., Flask], locate: Any, serve: Callable[[Flask], Server], registry: Any,
    settings: Any,
) -> None:
    url = serve(make_portal(locate)).url
    package = os.urandom(1 << 20)
    with requests.Session() as http:
        token = _csrf(http.get(f"{url}/login").text)
        logged_in = http.post(f"{url}/login", data={"username": "admin", "csrf_token": token,
                                                    "password": settings.admin_password.get_secret_value()})
        assert logged_in.url.endswith("/models")
        token = _csrf(http.get(f"{url}/upload").text)
        answer = http.post(f"{url}/upload", data={"model_name": "big", "csrf_token": token},
                           files={"file": ("big.zip", package, "application/zip")})
    assert answer.status_code == 200 and answer.url.endswith("/models/m-big")
    [upload] = [r for r in registry.received if r.path == "/registry/upload-and-validate"]
    assert upload.files["file"] == ("big.zip", package)


def _multipart(fields: dict[str, str], size: int) -> tuple[bytes, str]:
    """A form with a zip of `size` zero bytes, encoded in memory (the test client leaks larger bodies' temp files)."""
    body = MultipartStream(fields, "file", "big.zip", io.BytesIO(bytes(size)), size)
    return body.read(), body.content_type


def _csrf(html: str) -> str:
    return html.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]


class SpyStream(io.BytesIO):
    """A file that remembers how much each read asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        self.asked.append(-1 if size is None else size)
        return super().read(size)


def test_the_multipart_body_is_read_in_bounded_chunks_and_parses_back() -> None:
    data = os.urandom(5 * CHUNK + 7)
    spy = SpyStream(data)
    body = MultipartStream({"model_name": 'we"ird\r\nname'}, "file", 'a"b.zip', spy, size_of(spy))
    chunks = list(body)
    assert all(0 < len(c) <= CHUNK for c in chunks)
    assert spy.asked and all(0 < n <= CHUNK for n in spy.asked)
    raw = b"".join(chunks)
    assert len(raw) == len(body)
    environ = {
        "wsgi.input": io.BytesIO(raw), "CONTENT_LENGTH": str(len(raw)), "CONTENT_TYPE": body.content_type,
        "REQUEST_METHOD": "POST",
    }
    _, form, files = parse_form_data(environ)
    assert form["model_name"] == 'we"ird\r\nname'
    assert files["file"].filename == 'a"b.zip'  # sent as a%22b.zip, read back as the name it was
    try:
        assert files["file"].read() == data
    finally:
        files["file"].close()


def test_a_stream_shorter_than_announced_is_an_error() -> None:
    body = MultipartStream({}, "file", "x.zip", io.BytesIO(b"abc"), 10)
    try:
        body.read()
    except OSError as exc:
        assert "ended before" in str(exc)
    else:
        raise AssertionError("a short stream must not be sent as if complete")
