"""Dataset files: every unusable file is one line naming the file, the line and the fix;
splits, duplicates across them, and the exact verifier."""

import json

import pytest

from opd.errors import UserError
from opd.tasks.base import Problem
from opd.tasks.dataset import DatasetTask, as_number, same_answer

ROWS = [{"prompt": f"what is {i} plus {i}", "answer": str(2 * i)} for i in range(10)]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def refusal(path, **kw) -> str:
    with pytest.raises(UserError) as err:
        DatasetTask(path, **kw)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_json_array_on_one_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS))
    assert refusal(path) == (
        f"dataset {path}, line 1: an array, not an object; write one object per line "
        '({"prompt": "...", "answer": "..."}), or give the whole array as a .json file'
    )


def test_a_json_file_may_hold_one_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2))
    task = DatasetTask(path)
    assert sum(len(v) for v in task.splits.values()) == 10


@pytest.mark.parametrize("line, kind", [('"just text"', "a string"), ("3", "a number"), ("[1, 2]", "an array"), ("null", "null")])
def test_rows_that_are_not_objects(tmp_path, line, kind):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + line + "\n")
    assert refusal(path) == (
        f'dataset {path}, line 3: {kind}, not an object; every line must be one JSON object, e.g. {{"prompt": "...", "answer": "..."}}'
    )


def test_latin1_bytes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(ROWS[0]) + '\n{"prompt": "caf\xe9", "answer": "1"}\n').encode("latin-1"))
    assert refusal(path) == (
        f"dataset {path}, line 2: not UTF-8 text (byte 0xe9 at column 16); re-save the file as UTF-8 "
        "(e.g. iconv -f latin1 -t utf-8 d.jsonl > fixed.jsonl)"
    )


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    message = refusal(path)
    assert message.startswith(f"dataset {path} is not a readable Parquet file (")
    assert message.endswith("); re-export it (e.g. pandas.DataFrame.to_parquet) or convert it to JSONL")


def test_parquet_rows_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert sorted(p.answer for s in DatasetTask(path).splits.values() for p in s) == sorted(r["answer"] for r in ROWS)


def test_directory_and_missing_file(tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    assert refusal(tmp_path / "data.jsonl") == (
        f"dataset {tmp_path / 'data.jsonl'} is a directory; point dataset= at a .jsonl or .parquet file inside it"
    )
    assert refusal(tmp_path / "nope.jsonl") == (
        f"dataset {tmp_path / 'nope.jsonl'} does not exist; check the path (dataset= takes a .jsonl or .parquet file)"
    )


def test_empty_prompt(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[3]["prompt"], rows[6]["prompt"] = "", "   "
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert refusal(path) == f"dataset {path}, line 4: empty 'prompt' (and 1 more rows); fill it in or remove the row"


def test_eval_fraction_that_leaves_no_train_split(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert refusal(path, eval_fraction=0.5) == (
        f"dataset {path} has 10 rows: eval_fraction=0.5 holds out 5 each for test and val, leaving none to train on; "
        "use eval_fraction <= 0.4, or add rows"
    )
    assert len(DatasetTask(path, eval_fraction=0.4).splits["train"]) == 2


def test_duplicates_across_splits_are_removed_from_evaluation_and_counted(tmp_path):
    rows = ROWS + [{"prompt": "  " + r["prompt"].replace(" ", "  "), "answer": r["answer"]} for r in ROWS]
    task = DatasetTask(write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.2)
    train = {" ".join(p.prompt.split()) for p in task.splits["train"]}
    held_out = [p for s in ("test", "val") for p in task.splits[s]]
    assert held_out and not any(" ".join(p.prompt.split()) in train for p in held_out)
    assert task.eval_duplicates == 8 - len(held_out)  # 4 test + 4 val rows were drawn


def test_every_eval_row_duplicated_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "same", "answer": "1"}] * 5)
    assert refusal(path) == (
        f"dataset {path}: every test row's prompt also appears among the training rows; remove the duplicate rows from the file"
    )


@pytest.mark.parametrize(
    "gold, got, same",
    [
        ("3", "3.0", True), ("0.30", "0.3", True), ("1e21", "1000000000000000000000", True), ("-0", "0", True),
        ("1,000", "1000", True), ("+5", "5.", True), (".5", "0.50", True), ("3", "4", False),
        ("0.1", "0.10000001", False), ("1e21", "1e20", False), ("Paris", " Paris. ", True), ("Paris", "paris", False),
        ("1/2", "0.5", False), ("12", "1,2", False), ("x = 3", "x  =  3", True),
    ],
)
def test_exact_verifier_compares_numbers_as_numbers(gold, got, same):
    assert same_answer(got, gold) is same
    assert exact_task().verify(Problem("p", gold), f"step one, step two. answer: {got}") is same


def exact_task() -> DatasetTask:
    """A DatasetTask with the exact verifier and no file behind it."""
    task = object.__new__(DatasetTask)
    task._check = None
    return task


def test_as_number_takes_plain_decimals_only():
    assert as_number("1e21") == 10**21 and as_number("-3.50") == as_number("-3.5")
    assert [as_number(t) for t in ("nan", "inf", "3 apples", "0x10", "", "1,00")] == [None] * 6
