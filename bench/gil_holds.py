"""How long the API's reading of one large body keeps every other thread waiting for the GIL.

    .venv/bin/python -m bench.gil_holds --rounds 5
    .venv/bin/python -m bench.gil_holds --rounds 5 --conflicting-replay

The API reads a body in a worker thread, but C code holds the GIL for as long as one call
takes, and the event loop, wanting it back, waits that long: every request of every key does.
This runs the steps a sample evaluation's body goes through before it is refused (decoded,
its request hashed, its samples read) for the body of the hostile-input tests: one sample whose
thoughts are 30 MiB of JSON text in a string. Meanwhile a probe thread asks for the GIL every
millisecond; `longest_wait_ms` is the longest it waited, as the event loop would have, and
`steps_s` how long the steps took. Run from another tree (PYTHONPATH) for a BEFORE.

With --conflicting-replay the body is a replay's under an Idempotency-Key whose job, stored by
this release, had another body: read up to its 409, as the route does (decoded, hashed,
checked against the job's hash; its samples are never read).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial

from app.api.sample_evaluations import SAMPLES_BODY
from app.errors import IdempotencyConflict, SampleFileError
from app.idempotency import RequestHash
from app.sample_files import samples_of
from bench.machine import describe

THOUGHTS = "[" + "[]," * (10 * 1024 * 1024) + "[]]"  # tests/test_hostile_input.py's HOSTILE_JSON
SAMPLE = {"prompt": "p", "response": "r"}  # the first request's, under the replay's key


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="times the body is read (default 5)")
    p.add_argument(
        "--conflicting-replay",
        action="store_true",
        help="read the body as a replay under a key whose job had another body, up to its 409",
    )
    p.add_argument("--json", help="also write the figures to this file")
    return p


def read_body(raw: bytes) -> None:
    """A sample evaluation's body read as the route reads it, up to its refusal."""
    body = SAMPLES_BODY.decode(raw)
    RequestHash(body)
    try:
        samples_of(body.samples, body.format, body.columns)
    except SampleFileError:
        return  # refused: the thoughts hold more JSON values than a list of thoughts may
    raise AssertionError("the samples were read: not the path the hostile-input tests time")


def replay_conflicting(raw: bytes, stored_hash: str) -> None:
    """A sample evaluation's body read as the route reads a replay of it, up to its 409: the
    key's job under that Idempotency-Key (stored by this release) holds `stored_hash`."""
    request_hash = RequestHash(SAMPLES_BODY.decode(raw))
    try:
        asyncio.run(request_hash.check_replay(stored_hash, may_be_legacy=False))
    except IdempotencyConflict:
        return
    raise AssertionError("the replay matched: not the conflict this times")


def longest_wait_beside(work: threading.Thread) -> float:
    """The longest a thread waited for the GIL (a 1 ms sleep's overshoot) while `work` ran."""
    longest = 0.0
    work.start()
    while work.is_alive():
        started = time.perf_counter()
        time.sleep(0.001)
        longest = max(longest, time.perf_counter() - started - 0.001)
    work.join()
    return longest


def main() -> None:
    args = _parser().parse_args()
    body = {"samples": [{**SAMPLE, "thoughts": THOUGHTS}], "grade": {}}
    raw = json.dumps(body, ensure_ascii=False).encode()
    if args.conflicting_replay:
        first = SAMPLES_BODY.decode(json.dumps({**body, "samples": [SAMPLE]}).encode())
        read: Callable[[], None] = partial(replay_conflicting, raw, RequestHash(first).value)
    else:
        read = partial(read_body, raw)
    waits, steps = [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        waits.append(longest_wait_beside(threading.Thread(target=read)))
        steps.append(time.perf_counter() - started)
    figures = {
        "machine": describe(),
        "body_mib": round(len(raw) / 2**20, 1),
        "conflicting_replay": args.conflicting_replay,
        "longest_wait_ms": [round(w * 1000, 1) for w in waits],
        "longest_wait_ms_median": round(statistics.median(waits) * 1000, 1),
        "steps_s": [round(s, 3) for s in steps],
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    main()
