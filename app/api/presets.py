"""/v1/presets: the named job configs this server ships (presets/*.yaml), read-only."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from app.api.deps import CurrentKey, PresetsDep
from app.api.errors import documented
from app.api.schemas import PresetOut
from app.errors import NotFound
from app.presets import Preset

router = APIRouter(prefix="/v1/presets", tags=["presets"])


def _out(preset: Preset) -> PresetOut:
    return PresetOut(**asdict(preset))


@router.get("", responses=documented(401, 503))
async def list_presets(key: CurrentKey, presets: PresetsDep) -> list[PresetOut]:
    """Every preset, by name, with its version (a hash of its config) and the fields it sets.
    A job starts from one with `"preset": NAME` and overrides any field in its `config`."""
    return [_out(preset) for preset in presets.all()]


@router.get("/{preset_name}", responses=documented(401, 404, 422, 503))
async def get_preset(preset_name: str, key: CurrentKey, presets: PresetsDep) -> PresetOut:
    preset = presets.named(preset_name)
    if preset is None:
        known = ", ".join(p.name for p in presets.all()) or "none"
        raise NotFound(f"no preset '{preset_name}'; this server has: {known}")
    return _out(preset)
