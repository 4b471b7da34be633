"""The scripted batch API behaves as the providers' do: files, a batch's lifecycle, output
in any order, per-line errors, refused large files, expiry and cancellation, and a proxy's
404 or 403 for a while."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.scripted_llm import ScriptedLLM, http_error, reply


def _line(n: int, schema: str = "seed_cot") -> dict[str, Any]:
    body = {
        "model": "scripted-model",
        "messages": [{"role": "user", "content": f"prompt {n}"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": schema, "schema": {}}},
    }
    return {"custom_id": f"req-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


@pytest.fixture
def http(scripted_llm: ScriptedLLM) -> httpx.Client:
    return httpx.Client(base_url=scripted_llm.base_url)


def _submit(
    http: httpx.Client, lines: list[dict[str, Any]], metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    uploaded = http.post("/files", files={"file": ("in.jsonl", _jsonl(lines))}, data={"purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.text
    created = _create(http, uploaded.json()["id"], metadata)
    assert created.status_code == 200, created.text
    batch: dict[str, Any] = created.json()
    return batch


def _create(http: httpx.Client, input_file_id: str, metadata: dict[str, Any] | None) -> httpx.Response:
    body = {"input_file_id": input_file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    return http.post("/batches", json=body | ({"metadata": metadata} if metadata is not None else {}))


def _lines(http: httpx.Client, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(line) for line in http.get(f"/files/{file_id}/content").text.splitlines()]


def test_a_batch_goes_through_validating_in_progress_finalizing_to_completed(
    http: httpx.Client, scripted_llm: ScriptedLLM
) -> None:
    batch = _submit(http, [_line(n) for n in range(3)])
    seen = [batch["status"]]
    while seen[-1] != "completed":
        seen.append(http.get(f"/batches/{batch['id']}").json()["status"])

    assert seen == ["validating", "in_progress", "finalizing", "completed"]
    done = http.get(f"/batches/{batch['id']}").json()
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    outputs = _lines(http, done["output_file_id"])
    assert [o["custom_id"] for o in outputs] == ["req-2", "req-1", "req-0"], "not in input order"
    assert all(o["response"]["status_code"] == 200 for o in outputs)
    assert done["error_file_id"] is None


def test_batch_lines_are_answered_from_the_same_scripts_as_online_calls(
    http: httpx.Client, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script("seed_cot", reply({"thoughts": ["scripted"], "response": "r"}), http_error(500))
    batch = _submit(http, [_line(0), _line(1), _line(2)])
    while (done := http.get(f"/batches/{batch['id']}").json())["status"] != "completed":
        pass

    outputs = {o["custom_id"]: o for o in _lines(http, done["output_file_id"])}
    errors = _lines(http, done["error_file_id"])
    content = outputs["req-0"]["response"]["body"]["choices"][0]["message"]["content"]
    assert json.loads(content)["thoughts"] == ["scripted"]
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("req-1", 500)]
    assert "req-2" in outputs
    assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert len(scripted_llm.requests_for("seed_cot")) == 3


def test_an_expired_batch_keeps_what_was_answered_and_reports_the_rest(
    http: httpx.Client, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.batches.hold = True
    batch = _submit(http, [_line(n) for n in range(4)])
    for _ in range(3):
        assert http.get(f"/batches/{batch['id']}").json()["status"] == "in_progress"

    scripted_llm.batches.expire(batch["id"], answered=1)

    done = http.get(f"/batches/{batch['id']}").json()
    assert done["status"] == "expired"
    assert [o["custom_id"] for o in _lines(http, done["output_file_id"])] == ["req-0"]
    errors = _lines(http, done["error_file_id"])
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("req-1", "batch_expired"),
        ("req-2", "batch_expired"),
        ("req-3", "batch_expired"),
    ]


def test_a_deleted_file_answers_404_as_openai_does_and_its_batch_still_names_it(
    http: httpx.Client, scripted_llm: ScriptedLLM
) -> None:
    batch = _submit(http, [_line(0)])
    while (done := http.get(f"/batches/{batch['id']}").json())["status"] != "completed":
        pass

    scripted_llm.batches.delete_file(done["output_file_id"])

    for path in (f"/files/{done['output_file_id']}/content", f"/files/{done['output_file_id']}"):
        gone = http.get(path)
        assert gone.status_code == 404
        assert gone.json() == {
            "error": {
                "message": f"No such File object: {done['output_file_id']}",
                "type": "invalid_request_error",
                "param": "id",
                "code": None,
            }
        }
    assert http.get(f"/batches/{batch['id']}").json()["output_file_id"] == done["output_file_id"]


def test_a_refused_batch_or_file_answers_the_status_asked_for_as_often_as_asked(
    http: httpx.Client, scripted_llm: ScriptedLLM
) -> None:
    batch = _submit(http, [_line(0)])
    scripted_llm.batches.refuse(batch["id"], 404, times=2)
    statuses = [http.get(f"/batches/{batch['id']}").status_code for _ in range(3)]
    while (done := http.get(f"/batches/{batch['id']}").json())["status"] != "completed":
        pass
    scripted_llm.batches.refuse(done["output_file_id"], 403)

    assert statuses == [404, 404, 200]
    assert {http.get(f"/files/{done['output_file_id']}/content").status_code for _ in range(5)} == {403}


def test_cancelling_a_batch_cuts_off_its_unanswered_lines(
    http: httpx.Client, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.batches.hold = True
    batch = _submit(http, [_line(0), _line(1)])

    cancelled = http.post(f"/batches/{batch['id']}/cancel").json()

    assert cancelled["status"] == "cancelled"
    assert {e["error"]["code"] for e in _lines(http, cancelled["error_file_id"])} == {"batch_cancelled"}
    assert scripted_llm.batches.cancel_requests == [batch["id"]]


def test_a_batch_cancelled_midway_gives_the_answers_it_had_in_its_output_file(
    http: httpx.Client, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.batches.hold = True
    batch = _submit(http, [_line(n) for n in range(3)])
    scripted_llm.batches.progress(batch["id"], answered=2)

    cancelled = http.post(f"/batches/{batch['id']}/cancel").json()

    assert cancelled["status"] == "cancelled"
    assert cancelled["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert sorted(o["custom_id"] for o in _lines(http, cancelled["output_file_id"])) == ["req-0", "req-1"]
    assert [e["custom_id"] for e in _lines(http, cancelled["error_file_id"])] == ["req-2"]


def test_a_batch_cancelled_where_cancelling_takes_time_names_its_files_only_once_cancelled(
    http: httpx.Client, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.batches.hold = True
    scripted_llm.batches.cancelling_s = 0.3
    batch = _submit(http, [_line(n) for n in range(3)])
    scripted_llm.batches.progress(batch["id"], answered=2)

    cancelling = http.post(f"/batches/{batch['id']}/cancel").json()
    still = http.get(f"/batches/{batch['id']}").json()
    time.sleep(0.3)
    again = http.post(f"/batches/{batch['id']}/cancel").json()

    assert [(b["status"], b["output_file_id"]) for b in (cancelling, still)] == [("cancelling", None)] * 2
    assert again["status"] == "cancelled"
    scripted_llm.batches.recancel_refused = True
    assert http.post(f"/batches/{batch['id']}/cancel").status_code == 400
    [listed] = http.get("/batches").json()["data"]
    assert (listed["status"], listed["output_file_id"]) == ("cancelled", again["output_file_id"])
    assert sorted(o["custom_id"] for o in _lines(http, again["output_file_id"])) == ["req-0", "req-1"]
    assert [e["custom_id"] for e in _lines(http, again["error_file_id"])] == ["req-2"]


def test_a_file_download_told_to_fail_answers_503_once(http: httpx.Client, scripted_llm: ScriptedLLM) -> None:
    batch = _submit(http, [_line(0)])
    while (done := http.get(f"/batches/{batch['id']}").json())["status"] != "completed":
        pass
    scripted_llm.batches.content_failures = 1

    statuses = [http.get(f"/files/{done['output_file_id']}/content").status_code for _ in range(2)]

    assert statuses == [503, 200]
    assert scripted_llm.batches.downloads[done["output_file_id"]] == 2


def test_files_over_the_size_limit_are_refused(http: httpx.Client, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.batches.max_file_bytes = 300

    refused = http.post(
        "/files", files={"file": ("in.jsonl", _jsonl([_line(0), _line(1)]))}, data={"purpose": "batch"}
    )

    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "file_too_large"


def test_a_batch_with_duplicate_custom_ids_fails_validation(http: httpx.Client) -> None:
    batch = _submit(http, [_line(0), _line(0)])

    failed = http.get(f"/batches/{batch['id']}").json()

    assert failed["status"] == "failed"
    assert failed["errors"]["data"][0]["code"] == "invalid_file"
    assert failed["output_file_id"] is None


def test_batches_are_listed_newest_first_in_pages_with_their_metadata(http: httpx.Client) -> None:
    made = [_submit(http, [_line(n)], metadata={"tag": str(n)}) for n in range(25)]

    first = http.get("/batches").json()
    rest = http.get("/batches", params={"limit": 100, "after": first["last_id"]}).json()

    newest_first = [b["id"] for b in reversed(made)]
    assert [b["id"] for b in first["data"]] == newest_first[:20], "the default page is 20"
    assert (first["has_more"], first["first_id"], first["last_id"]) == (
        True,
        newest_first[0],
        newest_first[19],
    )
    assert [b["id"] for b in rest["data"]] == newest_first[20:]
    assert rest["has_more"] is False
    assert [b["metadata"] for b in rest["data"]] == [{"tag": str(n)} for n in (4, 3, 2, 1, 0)]
    assert http.get("/batches", params={"limit": 101}).status_code == 400


def test_a_list_refusing_its_cursor_answers_the_first_page_and_refuses_the_next(
    http: httpx.Client, scripted_llm: ScriptedLLM
) -> None:
    for n in range(3):
        _submit(http, [_line(n)])
    scripted_llm.batches.list_cursor_refused, scripted_llm.batches.list_refusal_status = True, 400

    first = http.get("/batches", params={"limit": 2}).json()
    rest = http.get("/batches", params={"limit": 2, "after": first["last_id"]})

    assert (len(first["data"]), first["has_more"]) == (2, True)
    assert rest.status_code == 400


@pytest.mark.parametrize(
    "metadata",
    [{f"k{n}": "v" for n in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}, {"k": 1}, ["k", "v"]],
)
def test_metadata_beyond_the_providers_limits_is_refused(http: httpx.Client, metadata: Any) -> None:
    uploaded = http.post(
        "/files", files={"file": ("in.jsonl", _jsonl([_line(0)]))}, data={"purpose": "batch"}
    )

    refused = _create(http, uploaded.json()["id"], metadata)

    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_request"
