"""`.env.example` lists every setting of every service, and a copy of it with secrets filled in is valid."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from agent.settings import AgentSettings
from controller.settings import ControllerSettings
from frontend.settings import FrontendSettings
from miaas.cluster import Pki
from model_registry.settings import ModelRegistrySettings
from service_registry.settings import ServiceRegistrySettings

ROOT = Path(__file__).resolve().parents[1]
ALL = [ServiceRegistrySettings, ModelRegistrySettings, ControllerSettings, AgentSettings, FrontendSettings]


def env_names(cls: type[BaseSettings]) -> set[str]:
    prefix = cls.model_config.get("env_prefix", "")
    names = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.add(str(alias.choices[-1]))
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def example() -> dict[str, str]:
    pairs = re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", (ROOT / ".env.example").read_text(), re.M)
    return dict(pairs)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_setting_is_in_env_example(cls: type[BaseSettings]) -> None:
    missing = env_names(cls) - set(example())
    assert not missing, f"add to .env.example: {sorted(missing)}"


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_the_example_with_secrets_and_identities_made_is_valid(cls: type[BaseSettings],
                                                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env; the example's relative .miaas/pki paths land here
    Pki.ensure(tmp_path / ".miaas" / "pki")  # what `make up` makes
    for key, value in example().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FRONTEND_SECRET_KEY", secrets.token_hex(32))
    monkeypatch.setenv("FRONTEND_ADMIN_PASSWORD", secrets.token_urlsafe(16))
    cls()


def test_without_its_identity_no_service_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for key in ("MIAAS_CA_FILE", "CONTROLLER_CREDENTIAL_FILE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="ca_file"):
        ControllerSettings()  # type: ignore[call-arg]
    monkeypatch.setenv("MIAAS_CA_FILE", str(tmp_path / "nowhere.json"))
    with pytest.raises(ValueError, match="does not exist"):
        ControllerSettings()  # type: ignore[call-arg]
