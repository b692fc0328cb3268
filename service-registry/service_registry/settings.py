"""Settings of the service registry (env prefix SERVICE_REGISTRY_)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from miaas.settings import ServiceSettings


class ServiceRegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SERVICE_REGISTRY_")

    port: int = Field(8500, ge=0, le=65535)
    ttl_s: float = Field(15.0, gt=0, description="an instance without a heartbeat for this long expires")
