"""README's curl commands ask the API for what it serves: each names a route and method it
has, only query parameters that route reads with values it takes, and a JSON body (where one
is written out) its schema accepts. A renamed route, parameter or field leaves no example behind."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from jsonschema import Draft202012Validator

from app.config import Settings
from app.main import create_app
from tests.test_readme_cli import README

# Where the README's commands reach this API: $API, or the host and port spelled out.
OUR_API = re.compile(r"^(?:\$API|(?:https?://)?(?:localhost|127\.0\.0\.1):8000)(/[^?]*)(?:\?(.*))?$")
SEPARATORS = {";", "|", "||", "&", "&&", "(", ")", ">", "<", ">>"}
DATA = {"-d", "--data", "--data-raw", "--data-binary", "--data-urlencode"}
PLACEHOLDER = "PLACEHOLDER"  # what `<job id>` and the like read as: a value of any type


@dataclass
class Call:
    line: str
    method: str = "GET"
    path: str = ""
    query: list[tuple[str, str]] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)


def _logical_lines(block: str) -> Iterator[str]:
    """The block's commands, continuation lines joined and a quoted value spanning lines kept
    whole; `<job id>`-style placeholders read as PLACEHOLDER."""
    pending = ""
    for line in re.sub(r"<[^<>\n]*>", PLACEHOLDER, block.replace("\\\n", " ")).splitlines():
        pending += line + "\n"
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quotation still open: the value goes on on the next line
            continue
        yield pending
        pending = ""
    assert not pending, f"README: a quotation never closed in {pending!r}"


def _calls() -> Iterator[Call]:
    """Every README curl command against this API."""
    for block in re.findall(r"^```bash\n(.*?)^```", README, re.MULTILINE | re.DOTALL):
        for line in _logical_lines(block):
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";|&()<>")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            words = list(lexer)
            for start in (n for n, word in enumerate(words) if word == "curl"):
                args = []
                for word in words[start + 1 :]:
                    if word in SEPARATORS or word == "curl":
                        break
                    args.append(word)
                call = _call(line.strip(), args)
                if call is not None:
                    yield call


def _call(line: str, args: list[str]) -> Call | None:
    call, get, data = Call(line), "-G" in args, []
    for option, value in zip(args, [*args[1:], ""], strict=True):
        if option == "-X":
            call.method = value
        elif option in DATA:
            data.append(value)
        elif option == "--url-query":
            call.query.append(_pair(value))
        elif match := OUR_API.match(option):
            call.path = match[1]
            call.query += parse_qsl(match[2] or "", keep_blank_values=True)
    if not call.path:
        return None  # Label Studio's or Argilla's API, or a shell word that is no request
    if get:
        call.query += map(_pair, data)
    else:
        call.method = "POST" if call.method == "GET" and data else call.method
        call.bodies = data
    return call


def _pair(value: str) -> tuple[str, str]:
    name, _, value = value.partition("=")
    return name, value


CALLS = list(_calls())


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return create_app(Settings()).openapi()


def _operation(document: dict[str, Any], call: Call) -> dict[str, Any]:
    for template, operations in document["paths"].items():
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, urlsplit(call.path).path):
            assert call.method.lower() in operations, f"{call.line}: {template} has no {call.method}"
            return operations[call.method.lower()]  # type: ignore[no-any-return]
    raise AssertionError(f"{call.line}: the API has no route {call.path}")


def test_the_readme_has_curl_commands_of_every_kind_to_check() -> None:
    """The reading of the README finds what the tests below check."""
    assert len(CALLS) >= 50
    assert {call.method for call in CALLS} >= {"GET", "POST", "PATCH", "DELETE"}
    assert sum(bool(call.query) for call in CALLS) >= 15
    assert sum(_json(body) is not None for call in CALLS for body in call.bodies) >= 8


@pytest.mark.parametrize("call", CALLS, ids=[call.line[:70] for call in CALLS])
def test_a_readme_curl_command_names_a_route_and_parameters_the_api_has(
    call: Call, document: dict[str, Any]
) -> None:
    operation = _operation(document, call)
    known = {p["name"]: p["schema"] for p in operation.get("parameters", []) if p["in"] == "query"}
    for name, value in call.query:
        assert name in known, f"{call.line}: {name} is not among {set(known)}"
        if value == PLACEHOLDER:
            continue
        taken = _validator(document, known[name])
        # A value is text on the wire: a number or a boolean spelled as the route reads it, or
        # one of a repeatable parameter's list.
        read = [value, [value], *([] if _json(value) is None else [_json(value)])]
        assert any(map(taken.is_valid, read)), f"{call.line}: {name}={value}"


@pytest.mark.parametrize(
    "call", [call for call in CALLS if call.bodies], ids=[c.line[:70] for c in CALLS if c.bodies]
)
def test_a_readme_json_body_is_one_its_route_accepts(call: Call, document: dict[str, Any]) -> None:
    """Bodies written out as JSON; those elided (`{...}`), made by jq or read from a file are
    not checked."""
    schema = _operation(document, call)["requestBody"]["content"]
    for body in filter(None, map(_json, call.bodies)):
        assert "application/json" in schema, f"{call.line}: the route reads no JSON"
        validator = _validator(document, schema["application/json"]["schema"])
        errors = [error.message for error in validator.iter_errors(body)]
        assert errors == [], f"{call.line}: {errors}"


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator({**schema, "components": document["components"]})


def _json(body: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
