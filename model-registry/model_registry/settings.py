"""Settings of the model registry (env prefix MODEL_REGISTRY_; the model store is the cluster-wide MODEL_STORE)."""

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from miaas.settings import ServiceSettings

GiB = 1 << 30


class ModelRegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODEL_REGISTRY_", protected_namespaces=())

    port: int = Field(8510, ge=0, le=65535)
    model_store: Path = Field(
        Path(".miaas/models"),
        validation_alias=AliasChoices("model_store", "MODEL_STORE"),
        description="root of the version folders (an NFS mount in production), read by every agent",
    )
    database_url: str = Field("sqlite:///.miaas/model-registry.db", description="SQLAlchemy URL of the registry's DB")
    max_upload_bytes: int = Field(2 * GiB, gt=0, description="largest zip accepted; a bigger upload is a 413")
    max_entries: int = Field(10_000, gt=0, description="most entries (files and folders) in one zip")
    max_unpacked_bytes: int = Field(4 * GiB, gt=0, description="most bytes one zip may inflate to, in all")
    allow_requirement_urls: bool = Field(
        False, description="accept URLs in requirements.txt (direct references, VCS links, --index-url and the like)"
    )
    controller_url: str | None = Field(
        None, description="the controller, asked whether a version is deployed before it is deleted; when unset it "
                          "is looked up in the service registry",
    )
    max_ratio: float = Field(200.0, gt=1, description="most one entry may inflate relative to its compressed size")
