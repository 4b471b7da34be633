"""Worker CPU time per LLM call: the service's own overhead, with the LLM answering at once.

    .venv/bin/python -m bench.worker_cpu --prompts 1000 --workers 2 --max-jobs 40

The same run as bench.efficiency with the simulated latency (and jitter) at 0: the sum of
the arq worker processes' user+system CPU time (/proc/<pid>/stat) over the job, divided by
the number of LLM calls. `worker_cpu_ms_per_call_minus_idle` also removes what the workers
burn while idle (arq polling the queue), measured for --idle-s before the job.
With --profile DIR the workers run under py-spy and the summary lists their hotspots
(sampling slows them: take the CPU figure from a run without --profile).
"""

from __future__ import annotations

from bench.efficiency import measure, parser, report
from bench.stack import run_bounded

TARGET_MS = 1.0


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(latency_ms=0.0, jitter_ms=0.0)
    args = p.parse_args(argv)
    summary = run_bounded(lambda: measure(args, kind="worker_cpu"), args.time_limit)
    report(summary, "worker_cpu_ms_per_call", TARGET_MS, higher_is_better=False, json_path=args.json)


if __name__ == "__main__":
    main()
