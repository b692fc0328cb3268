"""Settings of the portal (env prefix FRONTEND_)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from frontend.passwords import MAX_SCRYPT_N, SCRYPT_N
from miaas.settings import ServiceSettings, check_secret

MIN_PASSWORD_LENGTH = 12
THREADS_FOR_PAGES = 8  # worker threads always left to pages when every live stream is open


class FrontendSettings(ServiceSettings):
    # Errors never echo what was given: a database URL holds a password, and the admin password is one.
    model_config = SettingsConfigDict(env_prefix="FRONTEND_", hide_input_in_errors=True)

    port: int = Field(8080, ge=0, le=65535)
    secret_key: SecretStr = Field(description="signs the session cookie; `openssl rand -hex 32`")
    admin_username: str = Field("admin", min_length=1, max_length=64, description="first admin, created once")
    admin_password: SecretStr = Field(description="password of the first admin; only used on the first start")
    database_url: str = Field("sqlite:///.miaas/frontend.db", description="where the portal keeps its users: "
                              "`sqlite:///PATH` (one host) or `postgresql+psycopg://USER:PASSWORD@HOST/DB`")
    secure_cookies: bool = Field(False, description="mark cookies Secure: set True behind HTTPS")
    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="largest model zip the portal accepts")
    session_hours: float = Field(12.0, gt=0, description="how long a login lasts at most")
    session_idle_minutes: float = Field(60.0, gt=0, description="a login ends after this long without a request")
    backend_timeout_s: float = Field(10.0, gt=0, description="timeout of calls to other services")
    upload_timeout_s: float = Field(600.0, gt=0, description="timeout of forwarding one upload to the registry")
    open_signup: bool = Field(False, description="anyone may create a viewer account; else only by invitation")
    invitation_hours: float = Field(72.0, gt=0, description="how long an invitation link stays valid")
    login_attempts: int = Field(5, ge=1, description="failed logins of one name from one address before each "
                                "further attempt waits (1 s, doubling)")
    login_max_delay_s: float = Field(300.0, gt=0, description="the longest wait between two logins of a name from "
                                     "an address")
    login_address_attempts: int = Field(50, ge=1, description="failed logins from one address (any names) per "
                                        "window; then 429")
    login_window_s: float = Field(900.0, gt=0, description="failures are forgotten this long after the last one "
                                  "(and the window of the address limit), in seconds")
    trusted_proxy_hops: int = Field(0, ge=0, le=5, description="reverse proxies in front of the portal whose "
                                    "X-Forwarded-For / -Proto are believed")
    password_scrypt_n: int = Field(SCRYPT_N, ge=2, le=MAX_SCRYPT_N, description="scrypt cost N of new password "
                                   "hashes (r=8, p=1); a power of two, at least 2^17")
    weak_password_hashes_for_tests: bool = Field(False, description="only for the test suite: allow "
                                                 "password_scrypt_n below 2^17")
    stream_max_s: float = Field(600.0, gt=0, le=86400, description="a live stream (and its log follow) ends after "
                                "this long; the browser reconnects")
    consume_bus: bool = Field(True, description="follow deployment-events and system-metrics for live pages")
    metrics_history_s: float = Field(600.0, gt=0, description="how far back the agents' charts reach")
    max_event_streams: int = Field(24, ge=1, description="live streams (Server-Sent Events) served at once")
    threads: int = Field(48, ge=4, description="HTTP worker threads; each live stream holds one")
    kafka_ui_url: str | None = Field(None, description="Kafka-UI's URL, linked from the bus page when set")

    @field_validator("secret_key")
    @classmethod
    def _secret_key_is_real(cls, value: SecretStr) -> SecretStr:
        return check_secret(value, "FRONTEND_SECRET_KEY")

    @field_validator("admin_password")
    @classmethod
    def _admin_password_is_real(cls, value: SecretStr) -> SecretStr:
        return check_secret(value, "FRONTEND_ADMIN_PASSWORD", MIN_PASSWORD_LENGTH)

    @field_validator("database_url")
    @classmethod
    def _database_is_sqlite_or_postgresql(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"FRONTEND_DATABASE_URL is not a database URL: {exc}") from None
        if url.drivername in ("postgresql", "postgres"):  # the plain name means psycopg2, which is not installed
            url = url.set(drivername="postgresql+psycopg")
        if url.drivername not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
            raise ValueError(f"FRONTEND_DATABASE_URL must be sqlite:///PATH or postgresql+psycopg://..., not "
                             f"{url.drivername}://")
        return url.render_as_string(hide_password=False)

    @field_validator("kafka_ui_url")
    @classmethod
    def _kafka_ui_is_a_web_url(cls, value: str | None) -> str | None:
        if value and not value.lower().startswith(("http://", "https://")):
            raise ValueError("FRONTEND_KAFKA_UI_URL must be an http(s) URL")
        return value or None

    @field_validator("password_scrypt_n")
    @classmethod
    def _scrypt_n_is_a_power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("FRONTEND_PASSWORD_SCRYPT_N must be a power of two")
        return value

    @model_validator(mode="after")
    def _hashes_are_strong(self) -> FrontendSettings:
        if self.password_scrypt_n < SCRYPT_N and not self.weak_password_hashes_for_tests:
            raise ValueError(f"FRONTEND_PASSWORD_SCRYPT_N must be at least {SCRYPT_N} (2^17, OWASP's minimum); "
                             "lower costs are only for the test suite (FRONTEND_WEAK_PASSWORD_HASHES_FOR_TESTS)")
        return self

    @model_validator(mode="after")
    def _failures_outlast_the_longest_wait(self) -> FrontendSettings:
        if self.login_window_s <= self.login_max_delay_s:
            raise ValueError("FRONTEND_LOGIN_WINDOW_S must be longer than FRONTEND_LOGIN_MAX_DELAY_S, or waiting out "
                             "the longest delay would forget the failures")
        return self

    @model_validator(mode="after")
    def _threads_left_for_pages(self) -> FrontendSettings:
        if self.threads < self.max_event_streams + THREADS_FOR_PAGES:
            raise ValueError(f"FRONTEND_THREADS must be at least FRONTEND_MAX_EVENT_STREAMS + {THREADS_FOR_PAGES}: "
                             "each live stream holds a thread")
        return self
