"""Token-file sources through packing, loader and CLI: same rows as a HF dataset, exact resume."""

import json
import pickle
import tempfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchdata.stateful_dataloader import StatefulDataLoader

from cp_data.cli import main as cli_main
from cp_data.datasets import PackedDataset, PackedIterableDataset, open_token_files
from cp_data.packing import PackingConfig
from cp_data.sources import write_megatron, write_numpy
from hypothesis_profiles import few_examples

# these tests drive torchdata's StatefulDataLoader directly, outside cp-data's loader that silences this
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CP_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "cp_data_cache"))


def hf(docs):
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64"))})
    return datasets.Dataset.from_dict({"input_ids": docs}, features=features)


def write_split(docs, d: Path, how: str):
    """The documents as token files: one numpy file with a sidecar, two of them, or Megatron."""
    if how == "megatron":
        write_megatron(d / "m", docs, "int32")
        return open_token_files(d / "m.idx")
    if how == "numpy":
        write_numpy(d / "a.npy", docs, "uint32", sidecar=True)
        return open_token_files(d / "a.npy", dtype="uint32")
    half = len(docs) // 2  # rows then hold pieces of both files: the gather crosses files
    write_numpy(d / "a.npy", docs[:half], "uint16", sidecar=True)
    write_numpy(d / "b.npy", docs[half:], "uint16", sidecar=True)
    return open_token_files([d / "a.npy", d / "b.npy"], dtype="uint16")


def same_rows(a, b):
    return len(a) == len(b) and all(set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in y) for x, y in zip(a, b))


@few_examples
@given(
    docs=st.lists(st.lists(st.integers(1, 30000), max_size=30), max_size=25),
    seq_len=st.sampled_from([4, 8, 16, 24]),
    algorithm=st.sampled_from(["bfd", "concat"]),
    long_docs=st.sampled_from(["split", "truncate"]),
    cp_multiple=st.sampled_from([None, 2, 4]),
    how=st.sampled_from(["numpy", "two files", "megatron"]),
)
def test_packing_token_files_equals_packing_the_hf_dataset(docs, seq_len, algorithm, long_docs, cp_multiple, how):
    config = PackingConfig(seq_len, algorithm=algorithm, long_docs=long_docs, cp_multiple=cp_multiple, pad_token_id=-1)
    with tempfile.TemporaryDirectory() as tmp:
        source = write_split(docs, Path(tmp), how)
        reference = hf(docs)
        if not any(docs):  # nothing to pack: both sources refuse alike
            for src in (source, reference):
                with pytest.raises(ValueError, match="has no documents|documents of the source .* are empty"):
                    PackedDataset(src, config)
            return
        mapped, expected = PackedDataset(source, config), PackedDataset(reference, config)
        assert mapped.metrics() == expected.metrics()
        assert same_rows([mapped[i] for i in range(len(mapped))], [expected[i] for i in range(len(expected))])
        stream = list(PackedIterableDataset(source, config, buffer_size=5, carry_rows=1))
        assert same_rows(stream, list(PackedIterableDataset(reference, config, buffer_size=5, carry_rows=1)))


def corpus(tmp_path, n=150, seed=0):
    rng = np.random.default_rng(seed)
    # unique ids so every token traces back to its place; an EOS (0) ends every document
    lens = rng.integers(0, 40, n)
    ends = np.cumsum(lens)
    docs = [list(range(e - k + 1, e + 1)) + [0] for e, k in zip(ends, lens)]
    write_numpy(tmp_path / "c.npy", docs, "uint32")
    return docs, open_token_files(tmp_path / "c.npy", dtype="uint32", eos_token_id=0)


def loader(src, nw):
    ds = PackedIterableDataset(src, PackingConfig(32, cp_multiple=4), buffer_size=16, carry_rows=2)
    return StatefulDataLoader(ds, batch_size=3, num_workers=nw, collate_fn=list)


@pytest.mark.parametrize("nw", [0, 2])
def test_streaming_resume_over_token_files_is_exact(tmp_path, nw):
    docs, src = corpus(tmp_path)
    full = [r for batch in loader(src, nw) for r in batch]
    real = sorted(int(t) for r in full for t in r["input_ids"][r["label_mask"]])
    assert real == sorted(t for d in docs for t in d)  # every token once, EOS tokens included
    assert same_rows(full, [r for batch in loader(hf(docs), nw) for r in batch])
    dl = loader(src, nw)
    it = iter(dl)
    head = [r for _ in range(5) for r in next(it)]
    resumed = loader(src, nw)
    resumed.load_state_dict(dl.state_dict())
    assert same_rows(head + [r for batch in resumed for r in batch], full)


@pytest.mark.parametrize("nw", [0, 2])
def test_map_style_rows_through_workers(tmp_path, nw):
    docs, src = corpus(tmp_path, seed=1)
    packed = PackedDataset(src, PackingConfig(48))
    rows = [r for batch in StatefulDataLoader(packed, batch_size=4, num_workers=nw, collate_fn=list) for r in batch]
    assert same_rows(rows, [PackedDataset(hf(docs), PackingConfig(48))[i] for i in range(len(packed))])


def test_pickle_ships_offsets_not_tokens(tmp_path):
    tokens = np.ones(1_000_000, dtype=np.uint16)
    tokens[999::1000] = 0  # 1000 documents of 1000 tokens
    tokens.tofile(tmp_path / "p.npy")
    src = open_token_files(tmp_path / "p.npy", dtype="uint16", eos_token_id=0)
    blob = pickle.dumps(PackedDataset(src, PackingConfig(1000)))
    assert len(blob) < 200_000  # offsets and plan (~1000 documents), not 2 MB of tokens
    again = pickle.loads(blob)
    assert again.store[5].tolist() == src[5].tolist() and not again.store[5].flags.writeable


def test_cli_inspect_and_demo_on_token_files(tmp_path, capsys):
    docs, _ = corpus(tmp_path)
    write_megatron(tmp_path / "m", docs, "uint16")
    args = ["--seq-len", "64", "--cp", "2", "--batches", "2", "--json", "--no-progress"]
    assert cli_main(["inspect", str(tmp_path / "c.npy"), "--dtype", "uint32", "--eos-id", "0", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["packing"]["documents"] == len(docs) and out["packing"]["tokens"] == sum(map(len, docs))
    assert cli_main(["demo", "--source", str(tmp_path / "m.idx"), *args]) == 0
    demo = json.loads(capsys.readouterr().out)
    assert demo["packing"] == out["packing"] and demo["num_batches"] == 2
    assert cli_main(["inspect", str(tmp_path / "c.npy"), "--eos-id", "0", *args]) == 1
    assert "c.npy is a headerless token file: pass its dtype" in capsys.readouterr().err


def test_pipeline_conversion_gives_back_the_corpus_in_every_format(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
    import train_from_token_files as pipeline

    docs = [np.asarray(d, dtype=np.int64) for d in corpus(tmp_path)[0][:40]]
    docs = [d % 250 + 1 for d in docs]  # byte-tokenizer ids; EOS 0 only at the ends
    for d in docs:
        d[-1] = 0
    formats = pipeline.write_formats(docs, tmp_path)
    assert sorted(formats) == ["llmc", "megatron", "nanogpt", "numpy + sidecar", "numpy, EOS scan"]
    config = PackingConfig(32)
    packed, lines = pipeline.check_formats(hf([d.tolist() for d in docs]), docs, formats, config)
    assert all(line.count(": True") == 2 and "MISMATCH" not in line for line in lines)
    assert all(len(p) == len(PackedDataset(hf([d.tolist() for d in docs]), config)) for p in packed.values())
    altered = hf([d.tolist() for d in docs[:-1]] + [docs[-1][:-2].tolist() + [0]])
    _, lines = pipeline.check_formats(altered, docs, formats, config)
    assert all(": True" in line and line.endswith("MISMATCH") for line in lines)
