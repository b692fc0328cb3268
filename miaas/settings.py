"""Typed settings shared by every service; each service extends `ServiceSettings` with its own prefix."""

from __future__ import annotations

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
    """What every service needs: where it listens, the cluster token, the broker and the service registry."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True, env_ignore_empty=True)

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    public_url: str | None = Field(None, description="URL other services use to reach this one")
    service_token: SecretStr = shared("MIAAS_SERVICE_TOKEN")  # type: ignore[assignment]
    kafka_bootstrap: str = shared("MIAAS_KAFKA_BOOTSTRAP", "127.0.0.1:9092")  # type: ignore[assignment]
    service_registry_url: str | None = shared("MIAAS_SERVICE_REGISTRY_URL", None)  # type: ignore[assignment]
    heartbeat_interval_s: float = shared("MIAAS_HEARTBEAT_INTERVAL_S", 5.0, gt=0)  # type: ignore[assignment]
    log_level: str = shared("MIAAS_LOG_LEVEL", "INFO")  # type: ignore[assignment]

    @field_validator("service_token")
    @classmethod
    def _token_is_real(cls, value: SecretStr) -> SecretStr:
        return check_secret(value, "MIAAS_SERVICE_TOKEN")
