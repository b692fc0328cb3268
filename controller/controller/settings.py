"""Settings of the controller (env prefix CONTROLLER_)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

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
