"""HF layer: map-style packed datasets, token stores, corpus, errors (streaming: test_streaming.py)."""

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cp_data.datasets import (
    ByteTokenizer,
    PackedDataset,
    PackedIterableDataset,
    load_default_corpus,
    packed_dataset_from_files,
    tokenize_dataset,
    train_bpe,
)
from cp_data.packing import PackingConfig
from hypothesis_profiles import few_examples


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CP_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "cp_data_cache"))


def make_docs(n=120, max_len=40, seed=0):
    rng = np.random.default_rng(seed)
    # unique token values so every token can be traced back to its document
    lens = rng.integers(0, max_len, n)
    ends = np.cumsum(lens)
    return [list(range(e - k + 1, e + 1)) for e, k in zip(ends, lens)]


def token_dataset(docs, chunks=1):
    """``docs`` as an int64 token column, stored in ``chunks`` arrow chunks."""
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64"))})
    parts = np.array_split(np.arange(len(docs)), chunks) if docs else [np.arange(0)]
    return datasets.concatenate_datasets(
        [datasets.Dataset.from_dict({"input_ids": [docs[i] for i in p]}, features=features) for p in parts]
    )


def real_tokens(rows):
    return sorted(int(t) for r in rows for t in r["input_ids"][r["label_mask"]])


def check_instance(row, S):
    assert row["input_ids"].dtype == torch.int64 and row["input_ids"].shape == (S,)
    assert row["doc_lens"].dtype == torch.int64 and int(row["doc_lens"].sum()) == S
    assert (row["doc_lens"] > 0).all()
    assert row["label_mask"].dtype == torch.bool and row["label_mask"].shape == (S,)


@few_examples  # each example builds a HF dataset
@given(
    st.lists(st.lists(st.integers(1, 10**6), max_size=30), max_size=25),
    st.integers(1, 16),
    st.sampled_from(["bfd", "concat"]),
)
def test_map_style_conserves_documents(docs, S, algorithm):
    ds = token_dataset(docs)
    if not any(docs):
        with pytest.raises(ValueError, match="has no documents" if not docs else f"all {len(docs)} documents"):
            PackedDataset(ds, S)
        return
    packed = PackedDataset(ds, PackingConfig(S, algorithm=algorithm, pad_token_id=-7))
    rows = [packed[i] for i in range(len(packed))]
    for row in rows:
        check_instance(row, S)
        assert (row["input_ids"][~row["label_mask"]] == -7).all()
    assert real_tokens(rows) == sorted(t for d in docs for t in d)
    assert packed.metrics()["empty_docs_skipped"] == sum(not d for d in docs)


def test_map_style_worked_rows_and_index_mapping():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [], [5, 6, 7, 8, 9, 10, 11]]})
    packed = PackedDataset(ds, PackingConfig(4, cp_multiple=2))
    got = [(packed[i]["input_ids"].tolist(), packed[i]["doc_lens"].tolist()) for i in range(len(packed))]
    assert got == [([1, 2, 3, 0], [4]), ([5, 6, 7, 8], [4]), ([9, 10, 11, 0], [4]), ([4, 0, 0, 0], [2, 2])]
    assert packed[-1]["label_mask"].tolist() == [True, False, False, False]
    m = packed.metrics()
    assert (m["rows"], m["docs_split"], m["empty_docs_skipped"], m["tokens"]) == (4, 1, 1, 11)
    shuffled = PackedDataset(ds.select([3, 0]), 8)  # select() index mapping is honoured
    assert shuffled[0]["input_ids"].tolist() == [5, 6, 7, 8, 9, 10, 11, 0]
    assert shuffled[1]["input_ids"].tolist() == [1, 2, 3, 0, 0, 0, 0, 0]


def test_bad_input_errors():
    ds = datasets.Dataset.from_dict({"text": ["a"], "ids": [[1.5]]})
    with pytest.raises(ValueError, match=r"'input_ids' not found.*\['text', 'ids'\]"):
        PackedDataset(ds, 8)
    with pytest.raises(ValueError, match="integer token ids, got list<item: double>"):
        PackedDataset(ds, 8, column="ids")
    with pytest.raises(ValueError, match="tokenize"):
        PackedDataset(ds, 8, column="text")
    with pytest.raises(ValueError, match="seq_len"):
        PackedDataset(datasets.Dataset.from_dict({"input_ids": [[1]]}), 0)
    with pytest.raises(ValueError, match="cp_multiple=3 does not divide seq_len=8"):
        PackedIterableDataset(ds, PackingConfig(8, cp_multiple=3), column="ids")
    with pytest.raises(ValueError, match="non-integer"):
        tokenize_dataset(ds, lambda t: [0.5], eos_token_id=None)
    with pytest.raises(ValueError, match="EOS"):
        tokenize_dataset(ds, lambda t: [1])


@few_examples
@given(st.lists(st.lists(st.integers(-3, 60), max_size=6), min_size=1, max_size=12), st.integers(1, 4))
def test_negative_token_ids_name_the_first_offending_document(docs, chunks):
    ds = token_dataset(docs, chunks)
    bad = [(i, t) for i, d in enumerate(docs) for t in d if t < 0]
    if not bad:
        if any(docs):
            assert real_tokens(list(PackedDataset(ds, 8))) == sorted(t for d in docs for t in d)
        return
    i, t = bad[0]
    with pytest.raises(ValueError, match=rf"document {i} holds the negative token id {t};"):
        PackedDataset(ds, 8)
    with pytest.raises(ValueError, match=rf"document {i} holds the negative token id {t};"):
        PackedIterableDataset(ds, 8)


def test_negative_ids_follow_the_index_mapping_and_empty_sources_are_refused():
    ds = token_dataset([[1, 2], [3, -100], [], [4]], chunks=2)
    with pytest.raises(ValueError, match=r"'input_ids': document 0 holds the negative token id -100;"):
        PackedDataset(ds.select([1, 0]), 8)
    assert len(PackedDataset(ds.select([0, 3]), 8)) == 1
    with pytest.raises(ValueError, match=r"the source \(Dataset with columns \['input_ids'\]\) has no documents"):
        PackedDataset(token_dataset([]), 8)
    with pytest.raises(ValueError, match="all 2 documents of the source"):
        PackedIterableDataset(ds.select([2, 2]), 8)


def test_default_corpus_bytes_round_trip_and_packing():
    ds = load_default_corpus("pydoc", "bytes")
    assert ds.column_names == ["name", "input_ids"] and ds.num_rows > 50
    from pydoc_data.topics import topics

    first = ds[0]
    assert first["input_ids"][-1] == ByteTokenizer.eos_token_id
    assert ByteTokenizer().decode(first["input_ids"]) == topics[first["name"].split(":", 1)[1]]
    packed = PackedDataset(ds, PackingConfig(4096, cp_multiple=8))
    m = packed.metrics()
    assert m["tokens"] == sum(len(t.encode()) + 1 for t in topics.values())
    assert m["docs_split"] > 0 and 0.9 < m["fill_rate"] <= 1.0
    check_instance(packed[0], 4096)


def test_bpe_corpus_and_files(tmp_path):
    tok = train_bpe(1024)
    assert tok.get_vocab_size() == 1024 and tok.token_to_id("<|endoftext|>") == 0
    ds = load_default_corpus("pydoc", "bpe", vocab_size=1024)
    ids = ds[0]["input_ids"]
    from pydoc_data.topics import topics

    assert ids[-1] == 0 and tok.decode(ids[:-1]) == topics[ds[0]["name"].split(":", 1)[1]]
    assert len(ids) < len(topics[ds[0]["name"].split(":", 1)[1]]) / 2  # BPE actually merges
    path = tmp_path / "docs.txt"
    path.write_text("hello world\n\nsecond line here\n")
    packed = packed_dataset_from_files(str(path), 8, tokenizer="bytes")
    m = packed.metrics()
    assert m["documents"] == 3 and m["empty_docs_skipped"] == 1
    assert m["tokens"] == len("hello world") + 1 + len("second line here") + 1
    stream = packed_dataset_from_files(str(path), 8, tokenizer="bytes", streaming=True)
    assert [r["input_ids"].tolist() for r in stream] == [packed[i]["input_ids"].tolist() for i in range(len(packed))]


def test_load_text_files_reads_parquet_by_extension(tmp_path):
    import datasets

    from cp_data.datasets import load_text_files

    datasets.Dataset.from_dict({"text": ["alpha beta", "gamma"]}).to_parquet(str(tmp_path / "d.parquet"))
    ds = load_text_files([str(tmp_path / "d.parquet")], cache_dir=tmp_path / "cache")
    assert ds["text"] == ["alpha beta", "gamma"]
    with pytest.raises(ValueError, match="'csv'"):
        load_text_files([str(tmp_path / "d.parquet")], file_format="csv")
