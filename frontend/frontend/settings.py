"""Settings of the portal (env prefix FRONTEND_)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from miaas.settings import ServiceSettings, check_secret

MIN_PASSWORD_LENGTH = 12


class FrontendSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FRONTEND_")

    port: int = Field(8080, ge=0, le=65535)
    secret_key: SecretStr = Field(description="signs the session cookie; `openssl rand -hex 32`")
    admin_username: str = Field("admin", min_length=1, max_length=64, description="first admin, created once")
    admin_password: SecretStr = Field(description="password of the first admin; only used on the first start")
    database_url: str = Field("sqlite:///.miaas/frontend.db", description="where the portal keeps its users")
    secure_cookies: bool = Field(False, description="mark cookies Secure: set True behind HTTPS")
    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="largest model zip the portal accepts")
    session_hours: float = Field(12.0, gt=0, description="how long a login lasts")
    backend_timeout_s: float = Field(10.0, gt=0, description="timeout of calls to other services")
    upload_timeout_s: float = Field(600.0, gt=0, description="timeout of forwarding one upload to the registry")

    @field_validator("secret_key")
    @classmethod
    def _secret_key_is_real(cls, value: SecretStr) -> SecretStr:
        return check_secret(value, "FRONTEND_SECRET_KEY")

    @field_validator("admin_password")
    @classmethod
    def _admin_password_is_real(cls, value: SecretStr) -> SecretStr:
        return check_secret(value, "FRONTEND_ADMIN_PASSWORD", MIN_PASSWORD_LENGTH)
