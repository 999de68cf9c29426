"""``cp-data inspect`` on inputs without documents or unreadable ones: exit 1 and one error line.

The command runs in this process (``cp_data.cli.main``), so each case costs a file read, not an
interpreter start.
"""

import json

import pytest

from cp_data.cli import main
from test_text_files import ELF  # the same unreadable bytes the API tests use
BLANK = "the file is empty or holds only blank lines"
NULLS = "all 3 'text' values are empty or null"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CP_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def error_line(capsys, argv, code=1):
    assert main(argv) == code
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # no traceback, no log line from datasets before ours
    assert lines[0].startswith("cp-data: error: ")
    return lines[0].removeprefix("cp-data: error: ")


@pytest.mark.parametrize(
    "name, content, why",
    [
        ("empty.jsonl", b"", BLANK),
        ("blank.jsonl", b"\n \n\n", BLANK),
        ("empty.txt", b"", BLANK),
        ("blank.txt", b"\n\n", BLANK),
        ("nulls.jsonl", b'{"text": null}\n{"text": ""}\n{"text": null}\n', NULLS),
        ("list.json", b"[]", "the file has no rows"),
    ],
)
def test_no_documents(tmp_path, capsys, name, content, why):
    path = tmp_path / name
    path.write_bytes(content)
    assert error_line(capsys, ["inspect", str(path), "--no-progress"]) == f"{path} holds no documents: {why}"


@pytest.mark.parametrize(
    "name, content, cause",
    [
        ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', "as json: JSON parse error: Invalid value. in row 1"),
        ("binary.jsonl", ELF, "as json: JSON parse error: Invalid value. in row 0"),
        ("binary.txt", ELF, "as text: 'utf-8' codec can't decode byte 0x80 in position 1: invalid start byte"),
        ("binary.parquet", ELF, "as parquet: Parquet magic bytes not found in footer."),
    ],
)
def test_unreadable_file(tmp_path, capsys, name, content, cause):
    path = tmp_path / name
    path.write_bytes(content)
    assert error_line(capsys, ["inspect", str(path), "--no-progress"]).startswith(f"cannot read {path} {cause}")


def test_empty_texts_are_counted_the_same_in_header_and_packing(tmp_path, capsys):
    path = tmp_path / "some-empty.jsonl"
    texts = [None, "", "one document", None, "and another one"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    argv = ["inspect", str(path), "--tokenizer", "bytes", "--seq-len", "64", "--cp", "2", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: 5 documents (3 empty, skipped) -> 1 row of 64 tokens"
    packing_line = next(line for line in out if line.startswith("packing: "))
    packing = dict(kv.split("=") for kv in packing_line.removeprefix("packing: ").split(", "))
    assert (packing["documents"], packing["empty_docs_skipped"]) == ("5", "3")
    assert packing["tokens"] == str(len("one document") + 1 + len("and another one") + 1)
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["packing"]["documents"], report["packing"]["empty_docs_skipped"]) == (5, 3)
