"""Duplicate prompts within one job: found at submission, reported with the job, and skipped
if the job asks.

Two prompts are *exact* duplicates when their texts are equal, and *normalised* duplicates
when `normalised` makes them equal (exact duplicates are normalised ones too). A prompt's
position is its index in the submitted list; a group names the first occurrence and the
positions that repeat it. The work is one pass with a dict, so linear in the prompts' text;
10,000 prompts take milliseconds, but a big body still takes long enough to call it off the
event loop."""

from __future__ import annotations

import unicodedata
from collections.abc import Hashable, Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, Field

Handling = Literal["keep", "skip"]


def normalised(prompt: str) -> str:
    """The form normalised duplicates share: Unicode NFKC (compatibility forms such as
    full-width letters or ligatures become plain ones), casefolded (a stronger lowercasing:
    "Straße" and "STRASSE" match), NFKC again (casefolding can leave text unnormalised), then
    every run of whitespace (as `str.split` sees it: Unicode spaces, tabs, newlines) as one
    space, and none at either end."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", prompt).casefold())
    return " ".join(folded.split())


class DuplicateGroup(BaseModel):
    first: int = Field(description="Position of the first occurrence.")
    repeats: list[int] = Field(description="Positions that repeat it, ascending.")


class DuplicateKind(BaseModel):
    count: int = Field(description="Prompts that repeat an earlier one (the sum of the groups' repeats).")
    groups: list[DuplicateGroup] = Field(description="By position of the first occurrence.")


class DuplicatesOut(BaseModel):
    """Duplicate prompts found at submission. Positions are indexes in the submitted list."""

    handling: Handling = Field(description="The job's `duplicates` option.")
    submitted: int = Field(description="Prompts submitted (with `skip`, more than the job's items).")
    exact: DuplicateKind = Field(description="Prompts with identical text.")
    normalised: DuplicateKind = Field(
        description="Prompts equal after normalisation (NFKC, casefold, whitespace collapsed and "
        "stripped; see the README's Duplicate prompts); exact duplicates are counted here too."
    )
    skipped: list[int] = Field(
        description="Positions no item was made for: with `skip`, every normalised repeat; with `keep`, none."
    )


def find(prompts: Sequence[str], handling: Handling) -> DuplicatesOut:
    """The duplicates among `prompts`, and what `handling` skips. Linear in their text."""
    normal = _groups(normalised(prompt) for prompt in prompts)
    return DuplicatesOut(
        handling=handling,
        submitted=len(prompts),
        exact=_groups(prompts),
        normalised=normal,
        skipped=sorted(p for group in normal.groups for p in group.repeats) if handling == "skip" else [],
    )


def _groups(keys: Iterable[Hashable]) -> DuplicateKind:
    first_at: dict[Hashable, int] = {}
    repeats: dict[int, list[int]] = {}
    for position, key in enumerate(keys):
        first = first_at.setdefault(key, position)
        if first != position:
            repeats.setdefault(first, []).append(position)
    return DuplicateKind(
        count=sum(map(len, repeats.values())),
        groups=[DuplicateGroup(first=first, repeats=r) for first, r in sorted(repeats.items())],
    )
