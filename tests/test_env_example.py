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
def test_the_example_with_secrets_filled_in_is_valid(cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for key, value in example().items():
        monkeypatch.setenv(key, value)
    for key in ("MIAAS_SERVICE_TOKEN", "FRONTEND_SECRET_KEY"):
        monkeypatch.setenv(key, secrets.token_hex(32))
    monkeypatch.setenv("FRONTEND_ADMIN_PASSWORD", secrets.token_urlsafe(16))
    cls()


def test_without_the_service_token_no_service_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MIAAS_SERVICE_TOKEN", raising=False)
    with pytest.raises(ValueError, match="service_token"):
        ControllerSettings()  # type: ignore[call-arg]
