"""Presets: named job configs shipped as data, one YAML file per preset (`presets/NAME.yaml`,
or the server's `presets_dir`), loaded and checked once when the API starts.

A preset's version is the hash of its config's canonical JSON, made as a policy set's is: the
same config always has the same version, and editing its description or notes makes none.
A job names a preset and may override any of its fields: objects (`limits`, `defaults`, a
role, `grading`...) merge key by key, anything else (a number, null, a list such as
`deliberators`) replaces. The merged config is resolved into the job's plan, which names the
preset and its version, so the stored plan says in full what the job ran."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from app.config import Settings, refused_start
from app.deliberation.policies import content_version
from app.errors import InvalidConfig, PresetVersionMismatch, UnknownPreset
from app.plan import JobConfigIn, PresetRef, resolve

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class InvalidPresets(Exception):
    """A preset file the server will not start with: the message names the file and the problem."""


class PresetFile(BaseModel):
    """What a preset's YAML file holds."""

    model_config = ConfigDict(extra="forbid")
    description: str
    notes: str = ""  # what is known and what is assumed, for people choosing a preset
    config: JobConfigIn  # exactly a job body's `config`


@dataclass(frozen=True)
class Preset:
    name: str
    version: str
    description: str
    notes: str
    config: dict[str, Any]  # the fields the file sets, as JSON: the rest are the server's defaults

    @property
    def ref(self) -> PresetRef:
        return PresetRef(name=self.name, version=self.version)


class Presets:
    """The presets this server ships, by name."""

    def __init__(self, presets: list[Preset]) -> None:
        self._by_name = {preset.name: preset for preset in presets}

    def all(self) -> list[Preset]:
        return sorted(self._by_name.values(), key=lambda preset: preset.name)

    def named(self, name: str) -> Preset | None:
        return self._by_name.get(name)

    def config_for(
        self, name: str | None, version: str | None, given: JobConfigIn
    ) -> tuple[JobConfigIn, PresetRef | None]:
        """A job's config: the preset `name` (at `version`, if pinned) with the fields `given`
        sets laid over it; `given` itself without a preset. Raises UnknownPreset,
        PresetVersionMismatch or InvalidConfig (a version without a preset)."""
        if name is None:
            if version is not None:
                raise InvalidConfig("'preset_version' pins a preset: give 'preset' too")
            return given, None
        preset = self.named(name)
        if preset is None:
            known = sorted(self._by_name)
            raise UnknownPreset(
                f"no preset '{name}'; this server has: {', '.join(known) or 'none'}", details={"known": known}
            )
        if version is not None and version != preset.version:
            raise PresetVersionMismatch(
                f"preset '{name}' is at version {preset.version} on this server, not {version}",
                details={"preset": name, "version": preset.version, "requested": version},
            )
        overrides = given.model_dump(mode="json", exclude_unset=True)
        return JobConfigIn.model_validate(merged(preset.config, overrides)), preset.ref


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` laid over it: objects merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in overrides.items():
        below = out.get(key)
        out[key] = merged(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return out


def load(directory: Path, settings: Settings) -> Presets:
    """Every `*.yaml` preset in `directory`, each checked as a job's config and resolved
    against `settings` (its endpoints must exist); InvalidPresets at the first bad one."""
    if not directory.is_dir():
        raise InvalidPresets(f"the presets directory {directory} does not exist")
    return Presets([_load_one(path, settings) for path in sorted(directory.glob("*.yaml"))])


def check_or_exit(program: str, settings: Settings) -> None:
    """For a server's entry point: the presets of `settings` load, or it exits as for refused
    settings (`refused_start`), with one line naming AIDSAFE_PRESETS_DIR and what is wrong. Once
    the app's start-up loads them, a bad one is a traceback of the server's start-up."""
    try:
        load(settings.presets_dir, settings)
    except InvalidPresets as exc:
        raise refused_start(program, [("AIDSAFE_PRESETS_DIR", str(exc))]) from None


def _load_one(path: Path, settings: Settings) -> Preset:
    if not NAME.match(path.stem):
        raise InvalidPresets(f"{path}: a preset's file name is its name: lowercase letters, digits, - and _")
    try:
        document = PresetFile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
        resolve(document.config, settings)
    except yaml.YAMLError as exc:
        raise InvalidPresets(f"{path}: not YAML ({_yaml_problem(exc)})") from None
    except UnicodeDecodeError as exc:
        raise InvalidPresets(f"{path}: not YAML ({exc})") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'the file'}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        raise InvalidPresets(f"{path}: not a preset ({problems})") from None
    except InvalidConfig as exc:
        raise InvalidPresets(f"{path}: {exc.message}") from None
    config = document.config.model_dump(mode="json", exclude_unset=True)
    # The policy sets' content hash, over a one-element list: the same canonical JSON rule.
    version = content_version([config])
    return Preset(path.stem, version, document.description.strip(), document.notes.strip(), config)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong with a YAML text and where, on one line: PyYAML's own message quotes the
    text on lines of its own, with a caret under the place."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem and exc.problem_mark:
        mark = exc.problem_mark
        return f"{exc.problem}, line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())
