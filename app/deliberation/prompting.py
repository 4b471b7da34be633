"""Prompt templates live as text files beside this module; this is the one renderer.

Every request puts the request-invariant part first (shared preamble + policies, then the
stage's instructions) so that servers with prefix caching reuse it across items.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from string import Template

from app.deliberation.policies import PolicySet

TEMPLATES = Path(__file__).parent / "prompts"


@cache
def _template(name: str) -> Template:
    return Template((TEMPLATES / f"{name}.txt").read_text(encoding="utf-8"))


def render(name: str, **values: object) -> str:
    """Fill template `name` (a file in prompts/ without .txt); a missing value is an error."""
    return _template(name).substitute({k: str(v) for k, v in values.items()}).strip()


def messages_for(
    stage: str, policies: PolicySet, *, user_template: str | None = None, **values: object
) -> list[dict[str, str]]:
    """System message (preamble, policies, stage instructions) then the item's user message,
    from `<stage>.user` unless another template is named."""
    system = "\n\n".join(
        (
            render(
                "preamble",
                policy_set_name=policies.name,
                policy_version=policies.version,
                policies=policies.text,
            ),
            render(f"{stage}.system"),
        )
    )
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": render(user_template or f"{stage}.user", **values)},
    ]
