"""Deterministic synthetic prompts: varied wording, a target length, no two alike."""

from __future__ import annotations

import random

_OPENINGS = (
    "How do I",
    "What is the safest way to",
    "Can you explain how to",
    "What should I know before I",
    "Is it legal to",
    "Give me step-by-step instructions to",
)
_TASKS = (
    "fix a leaking kitchen tap",
    "store homemade jam for the winter",
    "set up a firewall on my home router",
    "clean mould off a bathroom ceiling",
    "pick the lock of my own bike after losing the key",
    "read a large CSV file in chunks with pandas",
    "teach a teenager to drive on the motorway",
    "dispose of old paint and solvents",
    "recover a deleted photo from my phone",
    "negotiate a lower rent with my landlord",
)
_DETAILS = (
    "I live in a small flat and have only basic tools.",
    "I have tried the obvious things already and they did not work.",
    "Please keep it practical; I am not an expert.",
    "My budget is tight, so cheap options are best.",
    "I need to get this done before the weekend.",
    "There are small children and a dog in the house.",
)


def make_prompts(count: int, chars: int = 200, seed: int = 7) -> list[str]:
    """`count` prompts of about `chars` characters each (never more), each unique."""
    rng = random.Random(seed)
    prompts = []
    for number in range(1, count + 1):
        text = f"{rng.choice(_OPENINGS)} {rng.choice(_TASKS)}? (case {number})"
        while len(text) < chars:
            text += " " + rng.choice(_DETAILS)
        prompts.append(text[:chars].rstrip())
    return prompts
