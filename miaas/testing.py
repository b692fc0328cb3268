"""Helpers for the tests of every service: polling with a bound, a throwaway PostgreSQL schema, a cluster CA and
signing test clients."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from flask import Flask
from flask.testing import FlaskClient

from miaas.identity import CertificateAuthority, Credential, body_digest, sign_request

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float, what: str = "condition", interval: float = 0.05) -> T:
    """Poll until check() returns something truthy and return it; fail after `timeout` seconds (a generous bound
    for slow machines, never an assertion on time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


@contextmanager
def postgres_schema(server_url: str, prefix: str) -> Iterator[str]:
    """A SQLAlchemy URL of a fresh schema (first on the search path) in the server's database, dropped after.

    A schema costs well under a millisecond where a new database costs 200 ms.
    """
    import psycopg
    from sqlalchemy.engine import make_url

    server = make_url(server_url)
    schema = f"{prefix}_{uuid.uuid4().hex[:16]}"
    admin: dict[str, Any] = {"host": server.host, "port": server.port, "user": server.username,
                             "password": server.password, "dbname": server.database, "autocommit": True}
    with psycopg.connect(**admin) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield server.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(**admin) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


class SigningClient(FlaskClient):
    """A Flask test client whose every request is signed by `credential` (None: sent unsigned), as a
    `miaas.client.ServiceClient` signs over HTTP. `user` is sent as X-MIaaS-User."""

    credential: Credential | None = None
    user: str | None = None

    def _request_from_builder_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        req = super()._request_from_builder_args(args, kwargs)
        env = req.environ
        if self.user is not None:
            env["HTTP_X_MIAAS_USER"] = self.user
        if self.credential is None:
            return req
        body = env["wsgi.input"].read()
        env["wsgi.input"] = io.BytesIO(body)
        query = env.get("QUERY_STRING", "")
        path = (env.get("RAW_URI") or env.get("REQUEST_URI") or env["PATH_INFO"]).partition("?")[0]
        target = path + (f"?{query}" if query else "")
        headers = sign_request(self.credential, env["REQUEST_METHOD"], target, env.get("HTTP_HOST", ""),
                               body_digest(body), time.time(), user=env.get("HTTP_X_MIAAS_USER"))
        for name, value in headers.items():
            env["HTTP_" + name.upper().replace("-", "_")] = value
        return req


class Pki:
    """A throwaway cluster CA in `root` and credentials from it, for tests: the files services read, and signing
    test clients. `credential(subject, role)` issues a new key pair each call; `credential_file` writes one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority.generate()
        self.ca_key_file = root / "ca-key.json"
        self.ca_file = root / "ca.json"
        self.ca.save(self.ca_key_file, self.ca_file)
        self._files: dict[tuple[str, str, str | None], Path] = {}

    def credential(self, subject: str, role: str | None = None, *, url: str | None = None,
                   lifetime_s: float = 3600.0) -> Credential:
        return self.ca.credential(subject, role or subject, now=time.time(), lifetime_s=lifetime_s, url=url)

    def credential_file(self, subject: str, role: str | None = None, *, url: str | None = None) -> Path:
        """The credential file of (subject, role, url), written once and reused."""
        key = (subject, role or subject, url)
        if key not in self._files:
            path = self.root / f"{subject}-{role or subject}-{len(self._files)}.json"
            self.credential(subject, role, url=url).save(path)
            self._files[key] = path
        return self._files[key]

    def settings(self, role: str, subject: str | None = None) -> dict[str, Any]:
        """The settings of a service of `role`: `ca_file` and its `credential_file`."""
        return {"ca_file": self.ca_file, "credential_file": self.credential_file(subject or role, role)}

    def client(self, app: Flask, role: str | None = "admin", subject: str | None = None, *,
               user: str | None = None, url: str | None = None,
               credential: Credential | None = None) -> SigningClient:
        """A test client of `app` signing as a new identity of `role` (None: unsigned)."""
        app.test_client_class = SigningClient
        c = app.test_client()
        assert isinstance(c, SigningClient)
        if credential is not None:
            c.credential = credential
        elif role is not None:
            c.credential = self.credential(subject or role, role, url=url)
        c.user = user
        return c

    def join_token(self, *, ttl_s: float = 600.0, uses: int = 10) -> str:
        return self.ca.join_token(now=time.time(), ttl_s=ttl_s, uses=uses).token
