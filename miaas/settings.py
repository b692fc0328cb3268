"""Typed settings shared by every service; each service extends `ServiceSettings` with its own prefix."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values that appear in docs, examples and leaked-password lists: never accepted as a real secret or password.
_PLACEHOLDERS = {
    "change-me", "changeme", "secret", "password", "dev", "test", "token", "password123", "admin", "administrator",
    "letmein", "123456789012", "qwertyuiop12", "adminadmin12", "passwordpassword",
}
MIN_SECRET_LENGTH = 24


def check_secret(value: SecretStr, name: str, min_length: int = MIN_SECRET_LENGTH) -> SecretStr:
    """Refuse empty, short or placeholder secrets and passwords, so no default can reach production."""
    raw = value.get_secret_value()
    lowered = raw.strip().lower()
    if lowered in _PLACEHOLDERS or "change-me" in lowered or "changeme" in lowered:
        raise ValueError(f"{name} is a placeholder; generate one (e.g. `openssl rand -hex 32`)")
    if len(raw) < min_length:
        raise ValueError(f"{name} must be at least {min_length} characters long")
    return value


def shared(env: str, default: object = ..., **kw: object) -> object:
    """A field read from a cluster-wide MIAAS_* variable whatever the service's own prefix."""
    return Field(default, validation_alias=AliasChoices(env.removeprefix("MIAAS_").lower(), env), **kw)  # type: ignore[call-overload, no-any-return]


class ServiceSettings(BaseSettings):
    """What every service needs: where it listens, its identity, the broker and the service registry.

    `ca_file` (MIAAS_CA_FILE) is the cluster CA's public key, the same file everywhere; `credential_file`
    (<PREFIX>CREDENTIAL_FILE) is this service's own key and certificate (mode 0600), read again when it changes."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True, env_ignore_empty=True)

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    public_url: str | None = Field(None, description="URL other services use to reach this one")
    ca_file: Path = shared("MIAAS_CA_FILE", description="the cluster CA's public key (ca.json)")  # type: ignore[assignment]
    credential_file: Path = Field(description="this service's credential: its private key and certificate")
    revocation_interval_s: float = shared("MIAAS_REVOCATION_INTERVAL_S", 3.0, gt=0, le=60)  # type: ignore[assignment]
    kafka_bootstrap: str = shared("MIAAS_KAFKA_BOOTSTRAP", "127.0.0.1:9092")  # type: ignore[assignment]
    kafka_config: str = shared("MIAAS_KAFKA_CONFIG", "", description="JSON object of librdkafka settings added to "  # type: ignore[assignment]
                               "every broker client (SASL/SCRAM, TLS); read from the environment by miaas.bus")
    service_registry_url: str | None = shared("MIAAS_SERVICE_REGISTRY_URL", None)  # type: ignore[assignment]
    heartbeat_interval_s: float = shared("MIAAS_HEARTBEAT_INTERVAL_S", 5.0, gt=0)  # type: ignore[assignment]
    log_level: str = shared("MIAAS_LOG_LEVEL", "INFO")  # type: ignore[assignment]
    metrics_token: SecretStr | None = shared(  # type: ignore[assignment]
        "MIAAS_METRICS_TOKEN", None, description="a bearer token that lets a scraper which cannot sign (Prometheus) "
        "read /metrics; unset: only signed identities may")

    @field_validator("kafka_config")
    @classmethod
    def _kafka_config_is_valid(cls, value: str) -> str:
        from miaas.bus import KAFKA_CONFIG_ENV, kafka_config

        kafka_config(value)
        if value:  # miaas.bus reads the environment: a value from a .env file reaches it too
            os.environ.setdefault(KAFKA_CONFIG_ENV, value)
        return value

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token_is_strong(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None else check_secret(value, "MIAAS_METRICS_TOKEN")

    @field_validator("ca_file")
    @classmethod
    def _ca_is_readable(cls, value: Path) -> Path:
        from miaas.identity import load_ca_public

        load_ca_public(value)  # a clear error now rather than a refused request later
        return value

    @field_validator("credential_file")
    @classmethod
    def _credential_is_readable(cls, value: Path | None) -> Path | None:
        from miaas.identity import Credential

        if value is not None:
            Credential.load(value)
        return value
