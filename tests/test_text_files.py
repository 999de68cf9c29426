"""load_text_files on files that hold nothing or cannot be read: one ValueError naming the file and why."""

import datasets
import pytest

from cp_data.datasets import load_text_files

ELF = bytes(range(0x7F, 0x100)) * 4  # not UTF-8, not JSON


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "name, content",
    [("empty.jsonl", b""), ("blank.jsonl", b"\n  \n\t\n"), ("empty.txt", b""), ("blank.txt", b"\n\n")],
)
def test_files_without_documents_are_named(tmp_path, cache, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    why = "the file is empty or holds only blank lines"
    with pytest.raises(ValueError, match=f"^{path} holds no documents: {why}$"):
        load_text_files([str(path)], cache_dir=cache)
    # Also through a glob pattern, and with several such files at once.
    (tmp_path / f"also-{name}").write_bytes(content)
    with pytest.raises(ValueError, match=f"also-{name}, {path} hold no documents"):
        load_text_files(str(tmp_path / f"*{name}"), cache_dir=cache)


def test_an_empty_file_among_others_is_fine(tmp_path, cache):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text('{"text": "kept"}\n')
    assert load_text_files(str(tmp_path / "*.jsonl"), cache_dir=cache)["text"] == ["kept"]


@pytest.mark.parametrize(
    "name, content, cause",
    [
        ("rows.jsonl", b'{"text": "fine"}\n{"text": \n', "as json: JSON parse error: Invalid value. in row 1"),
        ("binary.jsonl", ELF, "as json: JSON parse error"),
        ("binary.txt", ELF, "as text: 'utf-8' codec can't decode byte 0x80"),
        ("binary.parquet", ELF, "as parquet: .*Parquet magic bytes not found"),
    ],
)
def test_unreadable_file_is_named_with_its_cause(tmp_path, cache, name, content, cause):
    good = tmp_path / f"good{name[name.index('.'):]}"
    if good.suffix == ".parquet":
        datasets.Dataset.from_dict({"text": ["fine"]}).to_parquet(str(good))
    else:
        good.write_text('{"text": "fine"}\n' if good.suffix == ".jsonl" else "fine\n")
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=f"^cannot read {bad} {cause}"):
        load_text_files([str(bad)], cache_dir=cache)
    # Among several files (or those a pattern matches), the one that fails is named, not them all.
    with pytest.raises(ValueError, match=f"^cannot read {bad} {cause}"):
        load_text_files([str(good), str(bad)], cache_dir=cache)
    with pytest.raises(ValueError, match=f"^cannot read {bad} {cause}"):
        load_text_files(str(tmp_path / f"*{good.suffix}"), cache_dir=cache)


@pytest.mark.parametrize("name, content", [("list.json", "[]"), ("objects.jsonl", "{}\n{}\n")])
def test_json_without_rows(tmp_path, cache, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=f"^{path} holds no documents: the file has no rows$"):
        load_text_files([str(path)], cache_dir=cache)
