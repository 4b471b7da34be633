"""Prompt sets as data: the templates every request is rendered from, named and versioned
like policy sets, and checked against what the stages fill them with.

A set gives every template (a full set): a CoT that names its prompt set then names the
whole wording that asked for it, and a registered set never changes when the built-in
templates do. The version is the hash of the templates' canonical JSON, so the same
wording always has the same version. The built-in set is the files in prompts/.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from string import Template
from types import MappingProxyType

from app.deliberation.config import Limits
from app.deliberation.policies import content_version
from app.deliberation.prompting import PromptSet
from app.deliberation.stages import DECLARED
from app.errors import shown_name

BUILTIN_NAME = "aidsafe-default"
TEMPLATE_DIR = Path(__file__).parent / "prompts"
# A placeholder's value may be 50,000 characters (the policies) or a whole reply: repeated
# without bound, a preamble of 20,000 characters made every request of a job some 100 MB, sent
# to the shared LLM, and rendering its requests to check them held the API's event loop for a
# second at submission. The built-in templates use each once.
MAX_PLACEHOLDER_USES = 3


@dataclass(frozen=True)
class Slots:
    """Where a template is used, and the placeholders it may and must show."""

    used_by: str  # the stage(s), as problems name them
    allowed: frozenset[str]
    required: frozenset[str]


def template_slots() -> dict[str, Slots]:
    """Every template of a full set, by name, with where it is used and what it may show.
    Derived from the stages' declarations on each call, not at import: it is cheap next to a
    registration or a job submission, and tests (mutation testing too) see what it derives."""
    # System templates are filled with the job's limits, user templates with the prompt and
    # the stage's values; the shared parts with what every request carries.
    limits = frozenset(f.name for f in fields(Limits))
    slots = {
        "preamble": Slots(
            "every stage (preamble)",
            frozenset({"policy_set_name", "policy_version", "policies"}),
            frozenset({"policies"}),
        ),
        "role_instructions": Slots(
            "every stage (a role's own instructions)",
            frozenset({"instructions"}),
            frozenset({"instructions"}),
        ),
        "reask.malformed": Slots(
            "every stage (re-ask after a malformed reply)", frozenset({"error"}), frozenset()
        ),
        "reask.truncated": Slots("every stage (re-ask after a cut-off reply)", frozenset(), frozenset()),
    }
    for spec in DECLARED:
        if spec.classifier_prompt is not None:  # one user message carrying the policies too
            shown = frozenset({"prompt", "policies", *spec.inputs})
            slots[spec.classifier_prompt] = Slots(spec.stage.value, shown, shown)
        if spec.templates is None:
            continue
        system, user = spec.templates
        stage = spec.stage.value
        shared = slots.get(system)  # the rejected CoT is asked with the zero-shot instructions
        if shared is None:
            used_by = stage
        elif stage in shared.used_by.split(", "):  # the standard-sampling baseline's rejected side
            used_by = shared.used_by
        else:
            used_by = f"{shared.used_by}, {stage}"
        slots[system] = Slots(used_by, limits, frozenset())
        inputs = frozenset({"prompt", *spec.inputs})
        slots[user] = Slots(stage, inputs | set(spec.extras), inputs)
    return slots


@dataclass(frozen=True)
class Problem:
    """Why a set cannot be used: which template (and stage), and which placeholder if any."""

    template: str
    stage: str  # "" for a template no stage uses
    placeholder: str | None
    message: str


def validate(templates: Mapping[str, str]) -> list[Problem]:
    """Every problem of a full set, in template order: a template no stage uses, a stage's
    template missing, unparseable `$` syntax, an unknown placeholder, a missing one."""
    declared = template_slots()
    problems = [
        Problem(name, "", None, f"unknown template '{name}'; the templates are {', '.join(declared)}")
        for name in sorted(templates)
        if name not in declared
    ]
    for name, slots in declared.items():
        text = templates.get(name)
        if text is None:
            problems.append(
                Problem(name, slots.used_by, None, f"stage {slots.used_by} has no template '{name}'")
            )
            continue
        problems += _template_problems(name, slots, Template(text))
    return problems


def _template_problems(name: str, slots: Slots, template: Template) -> list[Problem]:
    where = f"template '{name}' (stage {slots.used_by})"
    problems = []
    if not template.is_valid():
        try:
            template.substitute(dict.fromkeys(template.get_identifiers(), ""))
        except ValueError as invalid:  # it says where: "line 2, col 7"
            problems.append(
                Problem(name, slots.used_by, None, f"{where}: {invalid}; write $$ for a literal $")
            )
    used = set(template.get_identifiers())
    uses = Counter(
        found["named"] or found["braced"]
        for found in template.pattern.finditer(template.template)
        if found["named"] or found["braced"]
    )
    # A template may name a placeholder of 20,000 characters: each problem quotes it cut short.
    problems += [
        Problem(
            name,
            slots.used_by,
            shown_name(p),
            f"{where}: placeholder ${shown_name(p)} is used {count:,} times, at most {MAX_PLACEHOLDER_USES}",
        )
        for p, count in sorted(uses.items())
        if count > MAX_PLACEHOLDER_USES
    ]
    allowed = ", ".join(f"${p}" for p in sorted(slots.allowed)) or "none"
    problems += [
        Problem(
            name,
            slots.used_by,
            shown_name(p),
            f"{where}: unknown placeholder ${shown_name(p)}; it may use {allowed}",
        )
        for p in sorted(used - slots.allowed)
    ]
    problems += [
        Problem(name, slots.used_by, p, f"{where}: missing placeholder ${p}, which the stage needs")
        for p in sorted(slots.required - used)
    ]
    return problems


def prompt_set(name: str, templates: Mapping[str, str]) -> PromptSet:
    """The set of these templates, versioned by their content (not checked: see `validate`)."""
    return PromptSet(name, content_version(dict(templates)), MappingProxyType(dict(templates)))


@cache
def builtin() -> PromptSet:
    """The built-in set: the files in prompts/, by name without .txt."""
    files = sorted(TEMPLATE_DIR.glob("*.txt"))
    return prompt_set(
        BUILTIN_NAME, {f.name.removesuffix(".txt"): f.read_text(encoding="utf-8") for f in files}
    )
