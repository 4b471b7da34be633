"""Policy sets as data: validation-free rendering and content-hash versioning.

A policy set's version is the hash of its canonical JSON, so the same text always has the
same version and a stored CoT names exactly the rules that produced it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# The rendered text of a policy set goes into every request a job makes, on endpoints that
# tenants share: about 12,000 tokens of English at most (the default set is 7,300 characters).
MAX_POLICY_TEXT_CHARS = 50_000


@dataclass(frozen=True)
class PolicySet:
    """What the engine needs of a policy set: its identity and its text for prompts."""

    name: str
    version: str
    text: str


def content_version(content: object) -> str:
    """The hash of JSON `content` (policies, templates, a preset's config): its version."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def render_policies(policies: list[dict[str, Any]]) -> str:
    """Markdown-ish text of the policies, in their given order, for the prompt preamble."""
    sections = []
    for number, policy in enumerate(policies, start=1):
        lines = [f"## {number}. {policy['title']}", str(policy.get("scope", "")).strip()]
        for heading, key in (("Allowed", "allowed"), ("Not allowed", "not_allowed")):
            if policy.get(key):
                lines.append(f"{heading}:")
                lines.extend(f"- {entry}" for entry in policy[key])
        examples = policy.get("borderline_examples") or []
        if examples:
            lines.append("Borderline examples:")
            lines.extend(f'- "{ex["prompt"]}": {ex["guidance"]}' for ex in examples)
        sections.append("\n".join(line for line in lines if line))
    return "\n\n".join(sections)


def policy_set(name: str, policies: list[dict[str, Any]]) -> PolicySet:
    return PolicySet(name=name, version=content_version(policies), text=render_policies(policies))
