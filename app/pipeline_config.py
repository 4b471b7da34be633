"""A job's pipeline config: resolved from the request and server defaults at submission,
stored with the job (so it cannot change under it), and turned into the engine's config
by the worker."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.config import Settings
from app.deliberation.engine import PipelineConfig, RoleConfig
from app.errors import InvalidConfig


class RoleIn(BaseModel):
    """Any field left out falls back to the job's `defaults`, then to the server's."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str | None = Field(default=None, description="Name of a configured endpoint.")
    model: str | None = Field(default=None, max_length=200)
    temperature: float | None = Field(default=None, ge=0, le=2)


class JobConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agents: int | None = Field(default=None, ge=1, le=8, description="Deliberating agents.")
    max_rounds: int | None = Field(default=None, ge=1, le=20, description="Round budget.")
    max_tokens: int | None = Field(default=None, ge=64, le=16384, description="Per call.")
    defaults: RoleIn = Field(default_factory=RoleIn, description="Applies to every role.")
    intent: RoleIn | None = None
    seed: RoleIn | None = None
    deliberators: list[RoleIn] | None = Field(
        default=None, min_length=1, max_length=8, description="One per agent, in speaking order."
    )
    refiner: RoleIn | None = None


def resolve(config: JobConfigIn, settings: Settings) -> dict[str, Any]:
    """Fill every role from defaults and check endpoint names; raises InvalidConfig."""
    endpoints = settings.endpoints()
    agents = config.agents or (len(config.deliberators) if config.deliberators else settings.default_agents)
    if config.deliberators is not None and len(config.deliberators) != agents:
        raise InvalidConfig(
            f"'deliberators' lists {len(config.deliberators)} agents but 'agents' is {agents}"
        )

    def role(specific: RoleIn | None, path: str) -> dict[str, Any]:
        specific = specific or RoleIn()
        endpoint = specific.endpoint or config.defaults.endpoint or "default"
        if endpoint not in endpoints:
            raise InvalidConfig(
                f"{path}: unknown endpoint '{endpoint}'; configured: {', '.join(sorted(endpoints))}"
            )
        model = specific.model or config.defaults.model or endpoints[endpoint].default_model
        temperature = specific.temperature
        if temperature is None:
            temperature = config.defaults.temperature
        return {
            "endpoint": endpoint,
            "model": model or settings.llm_model,
            "temperature": settings.default_temperature if temperature is None else temperature,
        }

    deliberators = config.deliberators or [None] * agents
    return {
        "max_rounds": config.max_rounds or settings.default_max_rounds,
        "max_tokens": config.max_tokens or settings.default_max_tokens,
        "max_reasks": settings.max_reasks,
        "roles": {
            "intent": role(config.intent, "intent"),
            "seed": role(config.seed, "seed"),
            "deliberators": [role(d, f"deliberators[{i}]") for i, d in enumerate(deliberators)],
            "refiner": role(config.refiner, "refiner"),
        },
    }


def to_pipeline(stored: dict[str, Any]) -> PipelineConfig:
    roles = stored["roles"]
    return PipelineConfig(
        intent=RoleConfig(**roles["intent"]),
        seed=RoleConfig(**roles["seed"]),
        deliberators=tuple(RoleConfig(**d) for d in roles["deliberators"]),
        refiner=RoleConfig(**roles["refiner"]),
        max_rounds=stored["max_rounds"],
        max_tokens=stored["max_tokens"],
        max_reasks=stored["max_reasks"],
    )
