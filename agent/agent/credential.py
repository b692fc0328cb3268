"""The agent's own identity: its credential, obtained when it starts (loaded from its file, or joined with a join
token), renewed in the background before it expires.

Glossary:
- **CredentialHolder**: the one place the agent's credential is read from, by everything that signs (requests to
  the registries and the controller, bus messages, the revocation fetch). A renewal replaces what it holds: the
  next request and message are signed with the new key, without a restart.
- **bound URL**: the URL the agent served at when it joined, written in its certificate. The controller sends
  commands only there, so an agent that now serves elsewhere must be revoked and join again.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import AgentError
from agent.settings import AgentSettings
from miaas import identity, join
from miaas.errors import MiaasError, Unavailable

log = logging.getLogger(__name__)

REVOKE_HINT = "POST /controller/identities/revoke"


class NoCredential(AgentError):
    """The agent has no usable credential and cannot get one: it refuses to start."""

    code = "no_credential"


class CredentialHolder:
    """The agent's current credential (a CredentialSource). Empty until the agent has obtained it at start, unless
    built from a `source` (tests, or a credential managed elsewhere), which it then always reads as is."""

    def __init__(self, source: identity.CredentialSource | None = None) -> None:
        self.source = source
        self._credential: identity.Credential | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.source is not None or self._credential is not None

    def set(self, credential: identity.Credential) -> None:
        if self.source is not None:
            raise ValueError("this credential holder reads a given source; it cannot be set")
        with self._lock:
            self._credential = credential

    def get(self) -> identity.Credential:
        if self.source is not None:
            return self.source()
        with self._lock:
            found = self._credential
        if found is None:
            raise Unavailable("the agent has no credential yet: it obtains one when it starts serving",
                              code="no_credential")
        return found

    def __call__(self) -> identity.Credential:
        return self.get()


def problem_with(cert: identity.Certificate, settings: AgentSettings, verifier: identity.Verifier, token: str,
                 now: float) -> str | None:
    """Why a stored certificate cannot be this agent's now, whatever its URL (None: it can)."""
    try:
        verifier.certificate(token, now)
    except identity.Refused as exc:
        return exc.message
    if cert.role != identity.AGENT:
        return f"it is a certificate of role {cert.role}, not {identity.AGENT}"
    if cert.subject != settings.agent_id:
        return f"it is the certificate of agent {cert.subject}, not of {settings.agent_id} (AGENT_AGENT_ID)"
    return None


def obtain(settings: AgentSettings, url: str, *, controller_url: str | None, now: float,
           join_with: Callable[..., identity.Credential] = join.join) -> identity.Credential:
    """The agent's credential for serving at `url`: its credential file when that holds a valid certificate of this
    agent bound to `url`, else a new one joined with AGENT_JOIN_TOKEN (saved to the file). NoCredential when
    neither can be had, saying what to do."""
    path = settings.credential_path
    agent_id = settings.agent_id
    verifier = identity.Verifier(identity.load_ca_public(settings.ca_file))
    why_not = f"no credential file at {path}"
    if path.exists():
        try:
            stored = identity.Credential.load(path)
        except ValueError as exc:
            raise NoCredential(f"the agent's credential file cannot be used: {exc}; remove it and start with "
                               "AGENT_JOIN_TOKEN set to join again") from exc
        cert = stored.cert
        problem = problem_with(cert, settings, verifier, stored.token, now)
        if problem is None and cert.url != url:
            raise NoCredential(
                f"the certificate of agent {agent_id} ({path}) is bound to {cert.url}, but the agent now serves at "
                f"{url}; the controller sends commands only to the URL an agent joined with. Serve at {cert.url} "
                f"again (AGENT_PUBLIC_URL, AGENT_HOST, AGENT_PORT), or revoke it ({REVOKE_HINT} with "
                f'{{"subject": "{agent_id}"}}), remove {path}, and start with AGENT_JOIN_TOKEN set to join again')
        if problem is None:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:  # a key others can read is a key others may have: no model may read it
                log.warning("the agent's credential file %s was readable by others (mode %o); made it 0600", path,
                            mode)
                path.chmod(0o600)
            log.info("agent %s uses its credential %s (certificate %s, bound to %s)", agent_id, path, cert.serial,
                     cert.url)
            return stored
        why_not = f"the credential in {path} cannot be used: {problem}"
    if settings.join_token is None:
        raise NoCredential(f"agent {agent_id} has no credential ({why_not}) and no join token: set AGENT_JOIN_TOKEN "
                           "to a join token (an operator makes one with POST /controller/join-tokens) to join the "
                           f"cluster, or put this agent's credential at {path} (AGENT_CREDENTIAL_FILE)")
    if controller_url is None:
        raise NoCredential(f"agent {agent_id} must join the cluster ({why_not}) but does not know where the "
                           "controller is: set AGENT_CONTROLLER_URL (the service registry cannot be asked before "
                           "the agent has a credential)")
    log.info("agent %s joins the cluster at %s as %s (%s)", agent_id, controller_url, url, why_not)
    try:
        return join_with(controller_url, settings.join_token.get_secret_value(), agent_id=agent_id, url=url,
                         path=path)
    except MiaasError as exc:
        raise NoCredential(f"agent {agent_id} could not join the cluster at {controller_url}: {exc.message}; "
                           "check AGENT_JOIN_TOKEN (a token expires and has a number of uses) and "
                           "AGENT_CONTROLLER_URL") from exc


class Renewer:
    """Renews the agent's certificate once `miaas.join.needs_renewal` says so, checking every `interval_s`; a
    failed renewal is tried again at the next check (the current certificate stays in force until it expires)."""

    def __init__(
        self, holder: CredentialHolder, *, path: Path, controller_url: Callable[[], str], interval_s: float,
        clock: Callable[[], float] = time.time,
        renew_with: Callable[..., identity.Credential] = join.renew,
    ) -> None:
        self.holder = holder
        self.path = path
        self.controller_url = controller_url
        self.interval_s = interval_s
        self.clock = clock
        self.renew_with = renew_with
        self.renewed = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def renew_if_due(self) -> bool:
        """Renew now when due; True when the holder got a new credential."""
        current = self.holder()
        if not join.needs_renewal(current, self.clock()):
            return False
        staged = self.path.with_name(f".{self.path.name}.renewed")  # the file changes only once it is checked
        fresh = self.renew_with(self.controller_url(), current, path=staged)
        if (fresh.cert.subject, fresh.cert.role, fresh.cert.url) != (current.cert.subject, current.cert.role,
                                                                      current.cert.url):
            staged.unlink(missing_ok=True)
            raise NoCredential(f"the renewed certificate is of {fresh.cert.role} {fresh.cert.subject} at "
                               f"{fresh.cert.url}, not of this agent")
        os.replace(staged, self.path)
        self.holder.set(fresh)
        self.renewed += 1
        log.info("certificate of %s renewed: %s, valid until %s", fresh.cert.subject, fresh.cert.serial,
                 time.strftime("%Y-%m-%d %H:%M", time.gmtime(fresh.cert.not_after)))
        return True

    def start(self) -> Renewer:
        self._thread = threading.Thread(target=self._run, name="credential-renewal", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.renew_if_due()
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - the controller may be down: try again at the next check
                self.last_error = f"{exc.__class__.__name__}: {exc}"
                log.warning("renewing the agent's certificate failed (%s); trying again in %g s", self.last_error,
                            self.interval_s)
            self._stop.wait(self.interval_s)
