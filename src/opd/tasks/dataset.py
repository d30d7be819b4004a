"""Real data: a JSONL or Parquet file with a ``prompt`` field; ``answer`` (needed by methods
that verify, and for accuracy) and ``solution`` (needed by methods that train on references)
are optional. A ``.json`` file may also hold one JSON array of such objects.

Rows are split into train / val / test by a seeded shuffle (``eval_fraction`` of the rows
each for val and test, at least one row each); a val or test row whose prompt (up to
whitespace) also appears in the train split is removed from evaluation and counted
(``eval_duplicates``). A file that cannot be used (not UTF-8, not JSON objects, an empty
prompt, a corrupt Parquet file, too few rows to leave a train split) is refused with one
line naming the file, the line or row, and the fix.

Verifiers are pluggable: ``exact`` compares the extracted answer with the reference as
numbers when both are numbers (``3`` = ``3.0``, ``0.30`` = ``0.3``, ``1e21`` = its digits,
``1,000`` = ``1000``; exact decimal arithmetic), else as text after whitespace
normalization (and without a trailing period); ``math`` uses ``math-verify``
(``pip install opd[math]``). The answer is taken from the last ``\\boxed{...}``, else the
text after the last "answer:", else the last non-empty line.
"""

from __future__ import annotations

import json
import math
import random
import re
from decimal import Decimal
from pathlib import Path

from opd.errors import UserError
from opd.tasks.base import Problem

REQUIRED = ("prompt",)
SCALAR = (str, int, float)
ROW_EXAMPLE = '{"prompt": "...", "answer": "..."}'
JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """``(where, row)`` per row (``where``: "line 7" in JSONL, "row 7" in Parquet, "item 7"
    in a JSON array), every row a dict; any unusable file is one :class:`UserError`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset {path} does not exist; check the path (dataset= takes a .jsonl or .parquet file)")
    if path.is_dir():
        raise UserError(f"dataset {path} is a directory; point dataset= at a .jsonl or .parquet file inside it")
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    if path.suffix not in (".jsonl", ".json"):
        raise UserError(f"dataset {path}: expected a .jsonl or .parquet file")
    lines = _utf8_lines(path)
    if path.suffix == ".json" and lines and lines[0].lstrip().startswith("["):
        return _json_array_rows(path, "\n".join(lines))
    return [(f"line {n}", _object(path, f"line {n}", _json_line(path, n, line)))
            for n, line in enumerate(lines, 1) if line.strip()]


def _parquet_rows(path: Path) -> list[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        reason = str(err).split(". ")[0].split("\n")[0]
        raise UserError(
            f"dataset {path} is not a readable Parquet file ({reason}); re-export it "
            "(e.g. pandas.DataFrame.to_parquet) or convert it to JSONL"
        ) from None
    return [(f"row {n}", r) for n, r in enumerate(rows, 1)]


def _utf8_lines(path: Path) -> list[str]:
    lines = path.read_bytes().split(b"\n")
    for n, raw in enumerate(lines, 1):
        try:
            lines[n - 1] = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"dataset {path}, line {n}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                f"re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix})"
            ) from None
    return lines


def _json_line(path: Path, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"dataset {path}, line {n}: not valid JSON ({err.msg}); fix or remove that line") from None


def _json_array_rows(path: Path, text: str) -> list[tuple[str, dict]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"dataset {path}, line {err.lineno}: not valid JSON ({err.msg}); fix the file") from None
    if not isinstance(items, list):
        raise UserError(f"dataset {path}: expected a JSON array of objects or one object per line")
    return [(f"item {n}", _object(path, f"item {n}", item)) for n, item in enumerate(items, 1)]


def _object(path: Path, where: str, value) -> dict:
    if isinstance(value, dict):
        return value
    kind = JSON_KINDS.get(type(value), type(value).__name__)
    if isinstance(value, list) and where == "line 1":
        fix = f"write one object per line ({ROW_EXAMPLE}), or give the whole array as a .json file"
    else:
        fix = f"every line must be one JSON object, e.g. {ROW_EXAMPLE}"
    raise UserError(f"dataset {path}, {where}: {kind}, not an object; {fix}")


def to_problems(rows: list[tuple[str, dict]], path) -> list[Problem]:
    bad = [(w, r) for w, r in rows if not isinstance(r.get("prompt"), SCALAR)]
    if bad:
        raise UserError(
            f"dataset {path}: {len(bad)} of {len(rows)} rows lack a 'prompt' field "
            f"(first: {bad[0][0]}, keys {sorted(bad[0][1])}); every row needs one."
        )
    empty = [w for w, r in rows if not str(r["prompt"]).strip()]
    if empty:
        more = f" (and {len(empty) - 1} more rows)" if len(empty) > 1 else ""
        raise UserError(f"dataset {path}, {empty[0]}: empty 'prompt'{more}; fill it in or remove the row")
    answer = lambda r: str(r["answer"]) if isinstance(r.get("answer"), SCALAR) else ""  # noqa: E731
    return [Problem(str(r["prompt"]), answer(r), str(r.get("solution") or "")) for _, r in rows]


def extract_answer(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    match = re.findall(r"answer\s*[:：]\s*(.+)", text, flags=re.IGNORECASE)
    if match:
        return match[-1].strip()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _normalize(s: str) -> str:
    return " ".join(s.strip().rstrip(".").split())


NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")


def as_number(text: str) -> Decimal | None:
    """The exact value of a plain decimal number (``3``, ``-0.30``, ``1e21``, ``1,000``), else None."""
    t = _normalize(text)
    if THOUSANDS.fullmatch(t):
        t = t.replace(",", "")
    return Decimal(t) if NUMBER.fullmatch(t) else None


def same_answer(got: str, gold: str) -> bool:
    """Numbers compare as numbers (exactly), anything else as whitespace-normalized text."""
    a, b = as_number(got), as_number(gold)
    if a is not None and b is not None:
        return a == b
    return _normalize(got) == _normalize(gold)


def split_problems(problems: list[Problem], eval_fraction: float, path) -> dict[str, list[Problem]]:
    """``test``, ``val`` (``eval_fraction`` of the rows each, at least one) and ``train`` (the rest)."""
    n = len(problems)
    if n < 3:
        raise UserError(f"dataset {path} has {n} usable rows; at least 3 are needed (train, val, test).")
    n_eval = max(1, int(n * eval_fraction))
    if n - 2 * n_eval < 1:
        most = math.floor((n - 1) // 2 / n * 1000) / 1000
        raise UserError(
            f"dataset {path} has {n} rows: eval_fraction={eval_fraction} holds out {n_eval} each for test and val, "
            f"leaving none to train on; use eval_fraction <= {most}, or add rows"
        )
    return {"test": problems[:n_eval], "val": problems[n_eval : 2 * n_eval], "train": problems[2 * n_eval :]}


def drop_seen(splits: dict[str, list[Problem]], path) -> int:
    """Remove from ``test`` and ``val`` every row whose prompt (up to whitespace) is in ``train``;
    returns how many were removed."""
    seen = {" ".join(p.prompt.split()) for p in splits["train"]}
    removed = 0
    for name in ("test", "val"):
        kept = [p for p in splits[name] if " ".join(p.prompt.split()) not in seen]
        removed += len(splits[name]) - len(kept)
        if not kept:
            raise UserError(
                f"dataset {path}: every {name} row's prompt also appears among the training rows; "
                "remove the duplicate rows from the file"
            )
        splits[name] = kept
    return removed


class DatasetTask:
    """A dataset as a :class:`opd.tasks.base.Task`. ``eval_duplicates``: val/test rows
    removed because their prompt is also a training prompt."""

    name = "dataset"

    def __init__(self, path: str | Path, *, verifier: str = "exact", eval_fraction: float = 0.1, seed: int = 0):
        problems = to_problems(read_rows(path), path)
        random.Random(seed).shuffle(problems)
        self.splits = split_problems(problems, eval_fraction, path)
        self.eval_duplicates = drop_seen(self.splits, path)
        self._check = _math_check() if verifier == "math" else None

    def problems(self, split: str, n: int | None, seed: int) -> list[Problem]:
        return self.splits[split][:n] if n else list(self.splits[split])

    def extract_answer(self, completion: str) -> str | None:
        return extract_answer(completion)

    def verify(self, problem: Problem, completion: str) -> bool:
        got = extract_answer(completion)
        if got is None:
            return False
        if self._check is not None:
            return self._check(problem.answer, got)
        return same_answer(got, problem.answer)


def _math_check():
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise UserError("verifier=math needs math-verify: pip install 'opd[math]' (or use verifier=exact)") from err

    def check(gold: str, got: str) -> bool:
        return bool(verify(parse(f"${gold}$"), parse(f"${got}$")))

    return check
