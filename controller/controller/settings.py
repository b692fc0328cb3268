"""Settings of the controller (env prefix CONTROLLER_)."""

from __future__ import annotations

import socket
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from miaas import identity
from miaas.settings import ServiceSettings


class ControllerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CONTROLLER_")

    port: int = Field(8520, ge=0, le=65535)
    database_url: str = "sqlite:///.miaas/controller.db"
    suspect_after_intervals: float = Field(3.0, gt=0, description="missed metrics intervals before suspect")
    lost_after_s: float = Field(15.0, gt=0, description="seconds without metrics before an agent is lost")
    max_clock_skew_s: float = Field(30.0, gt=0, description="metrics dated further off are not fresh")
    agent_timeout_s: float = Field(15.0, gt=0, description="timeout of one command to an agent")
    default_runtime: str = "process"
    reconcile_interval_s: float = Field(
        1.0, gt=0, description="period of the reconcile loop: lost agents, queue, retries, orphan copies"
    )
    command_retries: int = Field(2, ge=0, description="quick retries of a command an agent could not be reached for")
    retry_base_s: float = Field(1.0, gt=0, description="backoff after the first failed command; doubles each time")
    retry_max_s: float = Field(30.0, gt=0, description="cap of the backoff between attempts")
    max_command_attempts: int = Field(
        5, ge=1, description="failed create commands before a placement its agent does not hold is queued again"
    )
    preemption: bool = Field(True, description="a deployment that fits nowhere may stop lower-priority ones")
    bus_probe_interval_s: float = Field(
        1.0, gt=0, description="seconds between two metadata requests of the controller to the broker (liveness)"
    )
    bus_probe_timeout_s: float = Field(
        2.0, gt=0, description="a metadata request unanswered this long: the broker does not answer, nobody is lost"
    )
    disruption_window_s: float = Field(
        2.0, ge=0, description="agents silent longer than their interval plus this are quiet; two or more falling "
                               "quiet together with none heard is a disruption of the path, not deaths"
    )
    idempotency_key_ttl_s: float = Field(
        86400.0, gt=0, description="how long an Idempotency-Key of POST /controller/deploy is remembered"
    )
    ca_key_file: Path | None = Field(
        None, description="the cluster CA's private key (ca-key.json): the controller issues agents their "
                          "certificates when they join; without it, joins and renewals answer 503"
    )
    agent_certificate_lifetime_s: float = Field(
        identity.AGENT_LIFETIME_S, gt=60, le=366 * 24 * 3600,
        description="how long a certificate issued to an agent (joined or renewed) is valid",
    )

    leader_lease_s: float = Field(
        6.0, ge=0.5, le=300, description="how long the leader lease lasts unrenewed (CONTROLLER_LEADER_LEASE_S): "
                                         "renewed every third of it; a standby takes over within about this long "
                                         "after the leader dies, so keep it well under CONTROLLER_LOST_AFTER_S"
    )
    controller_id: str = Field(
        "", validation_alias=AliasChoices("controller_id", "CONTROLLER_ID"), max_length=128,
        pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._:-]*$",
        description="this controller's name in the leader lease (CONTROLLER_ID); default <host name>:<port>; two "
                    "controllers on one database need different ids",
    )

    @model_validator(mode="after")
    def _default_controller_id(self) -> ControllerSettings:
        if not self.controller_id:
            self.controller_id = f"{socket.gethostname()}:{self.port}"[:128]
        return self

    @field_validator("ca_key_file")
    @classmethod
    def _ca_key_is_readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            identity.CertificateAuthority.load(value)  # a clear error at start rather than a 500 on the first join
        return value

    @model_validator(mode="after")
    def _ca_key_is_this_clusters(self) -> ControllerSettings:
        if self.ca_key_file is not None:
            key = identity.CertificateAuthority.load(self.ca_key_file).public_key
            public = identity.load_ca_public(self.ca_file)
            if key.public_bytes(Encoding.Raw, PublicFormat.Raw) != public.public_bytes(Encoding.Raw, PublicFormat.Raw):
                raise ValueError(f"ca_key_file {self.ca_key_file} is not the private key of ca_file {self.ca_file}: "
                                 "the certificates it issued would be refused everywhere")
        return self
