"""Prompt templates live as text files beside this module; this is the one renderer.

Every request puts the request-invariant part first (shared preamble + policies, then the
stage's instructions) so that servers with prefix caching reuse it across items.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import cache
from pathlib import Path
from string import Template

from app.deliberation.config import Limits
from app.deliberation.policies import PolicySet

TEMPLATES = Path(__file__).parent / "prompts"


@cache
def _template(name: str) -> Template:
    return Template((TEMPLATES / f"{name}.txt").read_text(encoding="utf-8"))


def render(name: str, **values: object) -> str:
    """Fill template `name` (a file in prompts/ without .txt); a missing value is an error."""
    return _template(name).substitute({k: str(v) for k, v in values.items()}).strip()


def instructed(
    policies: PolicySet, limits: Limits, instructions: str, system: str, user: str, **values: object
) -> list[dict[str, str]]:
    """The system message (preamble, policies, the stage's instructions from template
    `system` with the job's limits, then the role's own `instructions`) and the item's user
    message from template `user`."""
    preamble = render(
        "preamble", policy_set_name=policies.name, policy_version=policies.version, policies=policies.text
    )
    parts = [preamble, render(system, **asdict(limits))]
    if instructions:
        parts.append(render("role_instructions", instructions=instructions))
    return [
        {"role": "system", "content": "\n\n".join(parts)},
        {"role": "user", "content": render(user, **values)},
    ]
