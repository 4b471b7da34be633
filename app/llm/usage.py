"""What a server reports about a reply beyond the engine's ChatReply: the prompt tokens it
served from its prompt cache, which are priced apart (app/costs.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.deliberation.ports import ChatReply


@dataclass(frozen=True)
class MeteredReply(ChatReply):
    cached_prompt_tokens: int = 0  # of prompt_tokens (OpenAI counts them in)


def cached_prompt_tokens(reply: ChatReply) -> int:
    return reply.cached_prompt_tokens if isinstance(reply, MeteredReply) else 0


def reported_cached_tokens(usage: dict[str, Any]) -> int:
    """`usage.prompt_tokens_details.cached_tokens` (OpenAI, vLLM); 0 when absent or not a
    count: a server that says nothing about its cache is billed at the input price."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and not isinstance(cached, bool) and cached > 0 else 0
