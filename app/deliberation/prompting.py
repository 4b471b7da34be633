"""The one renderer of prompt templates, from the prompt set a job pinned
(app/deliberation/prompt_sets.py declares, loads and checks the sets).

Every request puts the request-invariant part first (shared preamble + policies, then the
stage's instructions) so that servers with prefix caching reuse it across items.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from string import Template

from app.deliberation.config import Limits
from app.deliberation.policies import PolicySet


@dataclass(frozen=True)
class PromptSet:
    """What the engine needs of a prompt set: its identity and every template by name
    (e.g. "seed.system"), as `string.Template` text."""

    name: str
    version: str
    templates: Mapping[str, str]

    def render(self, name: str, **values: object) -> str:
        """Fill template `name`; a placeholder without a value is an error."""
        return _filled(self.templates[name], **values)


def _filled(template: str, **values: object) -> str:
    return Template(template).substitute({k: str(v) for k, v in values.items()}).strip()


def instructed(
    policies: PolicySet,
    wording: PromptSet,
    limits: Limits,
    instructions: str,
    system: str,
    user: str,
    **values: object,
) -> list[dict[str, str]]:
    """The system message (preamble, policies, the stage's instructions from template
    `system` with the job's limits, then the role's own `instructions`) and the item's user
    message from template `user`."""
    templates = wording.templates
    role_instructions = templates["role_instructions"] if instructions else None
    return [
        {
            "role": "system",
            "content": _system_message(
                templates["preamble"], templates[system], role_instructions, policies, limits, instructions
            ),
        },
        {"role": "user", "content": wording.render(user, **values)},
    ]


@lru_cache(maxsize=64)
def _system_message(
    preamble: str,
    system: str,
    role_instructions: str | None,
    policies: PolicySet,
    limits: Limits,
    instructions: str,
) -> str:
    """Rendered once for the many calls that share it (by the templates' text, not the prompt
    set's name): kilobytes of policies, filled at every call, were 1.3 % of a worker's CPU."""
    preamble = _filled(
        preamble, policy_set_name=policies.name, policy_version=policies.version, policies=policies.text
    )
    parts = [preamble, _filled(system, **asdict(limits))]
    if role_instructions is not None:
        parts.append(_filled(role_instructions, instructions=instructions))
    return "\n\n".join(parts)
