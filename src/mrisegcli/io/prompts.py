"""The texts of ``mriseg predict``: one prompt checked (:func:`validate_text`), or a prompts
file of one input path and text per row (:func:`read_prompts`; CSV or JSON lines)."""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from mrisegcli.errors import InputError, MrisegError
from mrisegcli.io.discover import read_stdin

MAX_TEXT_CHARS = 10_000


def validate_text(text: str, what: str = "--text") -> str:
    """The prompt without surrounding whitespace; empty or over 10000 characters is refused.

    ``what`` names the prompt in the messages (``--text``, or a prompts file's row). A value
    that is not a string, or text that is not valid UTF-8 (bytes a terminal could not decode
    reach Python as lone surrogates), is refused naming what it is.
    """
    if text is not None and not isinstance(text, str):
        raise MrisegError(f"{what} must be a string, not {type(text).__name__}")
    stripped = (text or "").strip()
    _check_utf8(stripped, what)
    if not stripped:
        raise MrisegError(f"{what} is empty")
    if len(stripped) > MAX_TEXT_CHARS:
        raise MrisegError(
            f"{what} is {len(stripped)} characters long; the limit is {MAX_TEXT_CHARS}"
        )
    if not any(unicodedata.category(c)[0] in "LN" for c in stripped):
        raise MrisegError(f"{what} has no letters or digits")
    return stripped


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        # surrogateescape keeps an undecodable byte b as U+DC00 + b
        what_is = (
            f"the byte 0x{code - 0xDC00:02x}"
            if 0xDC80 <= code <= 0xDCFF
            else f"a lone surrogate U+{code:04X}"
        )
        raise MrisegError(
            f"{what} is not valid UTF-8 text ({what_is} at character {err.start + 1}); give the "
            "text in UTF-8"
        ) from None


@dataclass(frozen=True)
class PromptRow:
    """One row of a prompts file: an input path (relative to the current folder) and its text."""

    path: Path
    text: str
    line: int  # line of the file the row starts on (1-based), for messages


PROMPT_COLUMNS = ("path", "text")


def _row_error(name: str, line: int, row: int, problem: str) -> MrisegError:
    return MrisegError(f"line {line} (row {row}): {problem}", name)


def _prompt_row(name: str, line: int, row: int, values: Mapping[str, Any]) -> PromptRow:
    for column in PROMPT_COLUMNS:
        value = values.get(column)
        if value is None:
            raise _row_error(name, line, row, f"no {column!r} value")
        if not isinstance(value, str):
            raise _row_error(
                name, line, row, f"{column!r} must be a string, not {type(value).__name__}"
            )
    path = values["path"].strip()
    if not path:
        raise _row_error(name, line, row, "the path is empty")
    try:
        text = validate_text(values["text"], what="the text")
    except MrisegError as err:
        raise _row_error(name, line, row, str(err)) from None
    return PromptRow(Path(path).expanduser(), text, line)


def _csv_rows(name: str, content: str) -> list[PromptRow]:
    reader = csv.reader(io.StringIO(content))
    header: list[str] | None = None
    rows: list[PromptRow] = []
    start = 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue  # blank line
            if header is None:
                header = [c.strip().lower() for c in cells]
                lacking = [c for c in PROMPT_COLUMNS if c not in header]
                if lacking:
                    raise MrisegError(
                        f"line {line}: the first line must be a header naming the columns path and "
                        f"text (found {', '.join(repr(c) for c in cells)})",
                        name,
                    )
                continue
            if len(cells) > len(header):
                raise _row_error(
                    name,
                    line,
                    len(rows) + 1,
                    f"{len(cells)} values for {len(header)} columns (quote a text with commas)",
                )
            values = dict(zip(header, cells, strict=False))  # a short row lacks the last values
            rows.append(_prompt_row(name, line, len(rows) + 1, values))
    except csv.Error as err:
        raise MrisegError(f"line {reader.line_num}: not valid CSV ({err})", name) from None
    if header is None:
        raise MrisegError(
            "empty prompts file (expected a header path,text and one row per input)", name
        )
    return rows


def _jsonl_rows(name: str, content: str) -> list[PromptRow]:
    rows: list[PromptRow] = []
    for line, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as err:
            raise _row_error(name, line, len(rows) + 1, f"not valid JSON ({err.msg})") from None
        if not isinstance(values, dict):
            raise _row_error(
                name, line, len(rows) + 1, 'expected an object {"path": ..., "text": ...}'
            )
        rows.append(_prompt_row(name, line, len(rows) + 1, values))
    return rows


def read_prompts(source: str | Path, stdin: TextIO | None = None) -> list[PromptRow]:
    """The rows of a prompts file: CSV with a header naming ``path`` and ``text`` (other
    columns are ignored), or JSON lines ``{"path": ..., "text": ...}``; ``-`` reads stdin.

    The kind follows the extension (``.csv``, ``.jsonl``/``.ndjson``), else the content (a
    first line starting with ``{`` is JSON lines). The first bad row (a missing value, an empty
    or unusable text, bad CSV or JSON) raises a :class:`MrisegError` naming the file and row.
    """
    if str(source) == "-":
        name, content = "<stdin>", read_stdin(stdin, "the prompts")
        kind = ""
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise InputError("no such prompts file" if not path.exists() else "is not a file", path)
        try:
            content = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise InputError(
                f"is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                "save the prompts file as UTF-8",
                path,
            ) from err
        except OSError as err:
            raise InputError(f"cannot read the prompts file ({err})", path) from err
        kind = path.suffix.lower()
    content = content.lstrip("\ufeff")
    if kind not in (".csv", ".jsonl", ".ndjson"):
        first = next((x.strip() for x in content.splitlines() if x.strip()), "")
        kind = ".jsonl" if first.startswith("{") else ".csv"
    rows = _jsonl_rows(name, content) if kind in (".jsonl", ".ndjson") else _csv_rows(name, content)
    if not rows:
        raise MrisegError("the prompts file has no rows", name)
    return rows


__all__ = ["MAX_TEXT_CHARS", "PROMPT_COLUMNS", "PromptRow", "read_prompts", "validate_text"]
