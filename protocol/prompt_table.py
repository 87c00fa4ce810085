"""Prompt tables: the schema, reading Parquet / JSONL / CSV files, and row validation.

A prompt table has one row per editing prompt. Columns (``assets/clips/README.md`` has the
full description; the bundled set is one instance of this schema):

* required: ``video_path`` (the source clip; a relative path is relative to the table's
  folder) and ``instruction``;
* optional: ``prompt_id``, ``source_caption``, ``target_caption``, ``edit_category``,
  ``reference_image`` (relative like ``video_path``), ``split``, ``start_s`` and ``end_s``
  (the part of the clip to use, seconds), and the bundled set's ``clip_id``, ``edit_type``,
  ``checkable``, ``picture``, ``motion``.

Any other column is kept, per row, in :attr:`PromptRow.extra` (one info log names them).
A row without a ``prompt_id`` gets :func:`derived_prompt_id`. The file type is taken from the
suffix (:data:`TABLE_SUFFIXES`) and read with pyarrow.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from editrl.protocol.edits import CHECKABLE_EDIT_TYPES

logger = logging.getLogger("editrl.protocol.dataset")

REQUIRED_COLUMNS: tuple[str, ...] = ("video_path", "instruction")
"""Columns every prompt table has; a row with either null or blank is skipped."""
TEXT_COLUMNS: tuple[str, ...] = ("prompt_id", "source_caption", "target_caption", "edit_category", "reference_image",
                                 "split", "clip_id", "edit_type", "picture", "motion")
"""Optional text columns; absent or null is the empty string (``reference_image``: None)."""
OPTIONAL_COLUMNS: tuple[str, ...] = (*TEXT_COLUMNS, "checkable", "start_s", "end_s")
"""Every optional column the loader knows."""
TABLE_SUFFIXES: tuple[str, ...] = (".parquet", ".jsonl", ".csv")
"""File types a prompt table may have, by suffix."""
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass(frozen=True)
class PromptRow:
    """One editing prompt.

    ``video_path`` (and ``reference_image`` when given) are absolute. ``edit_type`` defaults
    to ``edit_category``; ``checkable`` to ``edit_type in CHECKABLE_EDIT_TYPES``, and a
    ``checkable`` row always has a checkable ``edit_type``. Absent or null text fields are
    empty strings. ``start_s`` / ``end_s``: the part of the clip to use, seconds from its first
    frame (None: its start / its end). ``extra``: the row's values of columns the schema does
    not know, by column name.
    """

    prompt_id: str
    video_path: str
    instruction: str
    clip_id: str = ""
    edit_category: str = ""
    edit_type: str = ""
    checkable: bool = False
    source_caption: str = ""
    target_caption: str = ""
    picture: str = ""
    motion: str = ""
    split: str = ""
    reference_image: str | None = None
    start_s: float | None = None
    end_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class RowProblem:
    """A row the loader skips: its index in the file (0-based), its prompt id (given or
    derived; empty when it cannot be told) and the rule it breaks."""

    index: int
    prompt_id: str
    problem: str


@dataclass(frozen=True)
class TableContents:
    """What :func:`read_prompt_table` found: the valid rows in file order, the skipped ones, and the row count."""

    path: Path
    rows: list[PromptRow]
    problems: list[RowProblem]
    total: int


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read a table file by its suffix: ``.parquet`` (pyarrow.parquet), ``.jsonl`` (one JSON
    object a line, pyarrow.json) or ``.csv`` (header line, pyarrow.csv; every known column is
    read as text and converted per row, so one bad cell skips a row, not the file).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: another suffix (naming the file and :data:`TABLE_SUFFIXES`), or the file
            cannot be parsed (naming it and pyarrow's reason).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"prompt table {path}: unsupported file type {suffix or '(no suffix)'!r}; "
                         f"accepted suffixes: {', '.join(TABLE_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt table not found: {path}")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(str(path))
        if suffix == ".jsonl":
            import pyarrow.json as pj

            return pj.read_json(str(path))
        import pyarrow.csv as pc

        text = {name: pa.string() for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)}
        return pc.read_csv(str(path), convert_options=pc.ConvertOptions(column_types=text))
    except pa.ArrowException as exc:
        raise ValueError(f"prompt table {path}: cannot read it as {suffix[1:]} ({exc})") from None


def derived_prompt_id(video_path: str, instruction: str, start_s: float | None, end_s: float | None) -> str:
    """The id of a row without ``prompt_id``: ``<clip file stem>-<first 10 hex digits of the
    SHA-1 of "video_path\\ninstruction\\nstart_s\\nend_s">`` (``video_path`` as written in the
    table, times as ``repr`` or empty), e.g. ``cat-3f2a9c01be``. It depends only on the row's
    content, not on its place in the file, so reordering or adding rows keeps every id."""
    key = "\n".join([video_path, instruction, "" if start_s is None else repr(start_s), "" if end_s is None else repr(end_s)])
    return f"{Path(video_path).stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _seconds(value: object, name: str) -> float | None:
    """A time column's value in seconds, or None; ValueError naming the rule."""
    if _blank(value):
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number of seconds") from None
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name}={value!r} must be a finite number of seconds >= 0")
    return seconds


def _flag(value: object) -> bool | None:
    """``checkable``: a bool, 0/1 or true/false/yes/no text, or None; ValueError otherwise."""
    if _blank(value):
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"checkable={value!r} is not true or false")


def _row(record: dict[str, Any], base_dir: Path, extra_columns: list[str]) -> PromptRow:
    """One record as a row; ValueError naming the rule it breaks."""
    bad = next((c for c in REQUIRED_COLUMNS if _blank(record.get(c))), None)
    if bad is not None:
        raise ValueError(f"field {bad!r} is null or empty")
    start_s, end_s = _seconds(record.get("start_s"), "start_s"), _seconds(record.get("end_s"), "end_s")
    if end_s is not None and (end_s <= (start_s or 0.0)):
        raise ValueError(f"start_s={start_s or 0.0} must be before end_s={end_s}")
    text = {c: "" if _blank(record.get(c)) else str(record[c]).strip() for c in TEXT_COLUMNS}
    edit_type = text["edit_type"] or text["edit_category"]
    flag = _flag(record.get("checkable"))
    checkable = edit_type in CHECKABLE_EDIT_TYPES if flag is None else flag
    if checkable and edit_type not in CHECKABLE_EDIT_TYPES:
        raise ValueError(f"checkable but edit_type {edit_type!r} is not one of {CHECKABLE_EDIT_TYPES}")
    video_path = str(record["video_path"]).strip()
    reference = text.pop("reference_image")
    prompt_id = text.pop("prompt_id") or derived_prompt_id(video_path, str(record["instruction"]), start_s, end_s)
    text.pop("edit_type")
    return PromptRow(
        prompt_id=prompt_id, video_path=str(base_dir / video_path), instruction=str(record["instruction"]),
        edit_type=edit_type, checkable=checkable, reference_image=str(base_dir / reference) if reference else None,
        start_s=start_s, end_s=end_s, extra={c: record[c] for c in extra_columns}, **text,
    )


def read_prompt_table(path: str | os.PathLike) -> TableContents:
    """Read a prompt table and validate every row, logging nothing about rows.

    Args:
        path: the table file (see :func:`read_table`).

    Returns:
        The valid rows in file order (paths resolved against the file's folder) and one
        :class:`RowProblem` per skipped row: a required field null or blank, a time not a
        number, negative or not finite, ``start_s >= end_s``, ``checkable`` not a truth
        value, or ``checkable`` with an ``edit_type`` that is not checkable.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unsupported suffix or unreadable file; a required column is missing
            (naming the file, the column and the columns present); two rows have the same
            ``prompt_id`` (given or derived; naming it and both row indices).
    """
    path = Path(path)
    table = read_table(path)
    columns = table.column_names
    for column in REQUIRED_COLUMNS:
        if column not in columns:
            raise ValueError(f"prompt table {path} has no column {column!r} (columns: {columns})")
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    extra_columns = [c for c in columns if c not in known]
    if extra_columns:
        logger.info("%s: columns %s are not part of the prompt schema; kept in PromptRow.extra", path, extra_columns)
    base_dir = path.resolve().parent
    rows: list[PromptRow] = []
    problems: list[RowProblem] = []
    first_row: dict[str, int] = {}
    records = table.to_pylist()
    for index, record in enumerate(records):
        try:
            row = _row(record, base_dir, extra_columns)
        except ValueError as exc:
            given = record.get("prompt_id")
            problems.append(RowProblem(index, "" if _blank(given) else str(given).strip(), str(exc)))
            continue
        if row.prompt_id in first_row:
            raise ValueError(f"prompt table {path} has duplicate prompt_id {row.prompt_id!r} "
                             f"(rows {first_row[row.prompt_id]} and {index})")
        first_row[row.prompt_id] = index
        rows.append(row)
    return TableContents(path, rows, problems, len(records))


def load_prompts(path: str | os.PathLike) -> list[PromptRow]:
    """Read and validate a prompt table (:func:`read_prompt_table`); skipped rows are logged
    with one warning each (file, row index, prompt id and rule), then one with the count.

    Returns:
        The valid rows in file order.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_prompt_table`; also ValueError when no
            valid row remains.
    """
    contents = read_prompt_table(path)
    for p in contents.problems:
        logger.warning("%s: skipping row %d (prompt_id %r): %s", contents.path, p.index, p.prompt_id or None, p.problem)
    if contents.problems:
        logger.warning("%s: skipped %d of %d rows", contents.path, len(contents.problems), contents.total)
    if not contents.rows:
        raise ValueError(f"prompt table {contents.path} has no valid rows "
                         f"({len(contents.problems)} of {contents.total} skipped)")
    return contents.rows
