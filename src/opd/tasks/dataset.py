"""Real data: a JSONL or Parquet file with a ``prompt`` field; ``answer`` (needed by methods
that verify, and for accuracy) and ``solution`` (needed by methods that train on references)
are optional.

Rows are split into train / val / test by a seeded shuffle (``eval_fraction`` of the rows
each for val and test, at least one row each). Verifiers are pluggable: ``exact`` compares
the extracted answer with the reference after whitespace normalization; ``math`` uses
``math-verify`` (``pip install opd[math]``). The answer is taken from the last
``\\boxed{...}``, else the text after the last "answer:", else the last non-empty line.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from opd.errors import UserError
from opd.tasks.base import Problem

REQUIRED = ("prompt",)
SCALAR = (str, int, float)


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix not in (".jsonl", ".json"):
        raise UserError(f"dataset {path}: expected a .jsonl or .parquet file")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"dataset {path}, line {n}: not valid JSON ({err.msg}); fix or remove that line") from err
    return rows


def to_problems(rows: list[dict], path) -> list[Problem]:
    bad = [i for i, r in enumerate(rows) if not isinstance(r.get("prompt"), SCALAR)]
    if bad:
        raise UserError(
            f"dataset {path}: {len(bad)} of {len(rows)} rows lack a 'prompt' field "
            f"(first: row {bad[0] + 1}, keys {sorted(rows[bad[0]])}); every row needs one."
        )
    answer = lambda r: str(r["answer"]) if isinstance(r.get("answer"), SCALAR) else ""  # noqa: E731
    return [Problem(str(r["prompt"]), answer(r), str(r.get("solution") or "")) for r in rows]


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


class DatasetTask:
    """A dataset as a :class:`opd.tasks.base.Task`."""

    name = "dataset"

    def __init__(self, path: str | Path, *, verifier: str = "exact", eval_fraction: float = 0.1, seed: int = 0):
        problems = to_problems(read_rows(path), path)
        if len(problems) < 3:
            raise UserError(f"dataset {path} has {len(problems)} usable rows; at least 3 are needed (train, val, test).")
        random.Random(seed).shuffle(problems)
        n_eval = max(1, int(len(problems) * eval_fraction))
        self.splits = {"test": problems[:n_eval], "val": problems[n_eval : 2 * n_eval], "train": problems[2 * n_eval :]}
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
        return _normalize(got) == _normalize(problem.answer)


def _math_check():
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise UserError("verifier=math needs math-verify: pip install 'opd[math]' (or use verifier=exact)") from err

    def check(gold: str, got: str) -> bool:
        return bool(verify(parse(f"${gold}$"), parse(f"${got}$")))

    return check
