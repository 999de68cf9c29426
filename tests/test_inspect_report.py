"""`cp-data demo` / `inspect` reports say which rows they show, and every table and plot shows it."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cp_data.cli import SETTINGS, build_parser, main
from cp_data.inspect import compare_balancers, plots, row_from_instances, shard_map
from cp_data.inspect.metrics import plural
from cp_data.inspect.sources import describe_sample, load_documents, pack_documents, sample_batches
from cp_data.packing import PackingConfig

plots.use_file_backend()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("CP_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # --no-progress sets it for child processes
    enabled = datasets.is_progress_bar_enabled()
    yield
    if enabled:  # --no-progress also switches datasets' bars off, process-wide
        datasets.enable_progress_bars()


@given(st.integers(0, 300), st.integers(1, 4), st.none() | st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_sample_spreads_over_the_whole_dataset(num_rows, batch_size, num_batches, seed):
    batches = sample_batches(num_rows, batch_size, num_batches, seed=seed)
    assert batches == sample_batches(num_rows, batch_size, num_batches, seed=seed)
    fit = num_rows // batch_size
    assert len(batches) == (fit if num_batches is None else min(num_batches, fit))
    assert all(len(b) == batch_size for b in batches)
    rows = np.array(sum(batches, []), dtype=np.int64)
    assert len(set(rows.tolist())) == rows.size and ((rows >= 0) & (rows < max(num_rows, 1))).all()
    if num_batches is not None and 0 < rows.size < num_rows:
        # One row from each of rows.size equal stretches: the sample reaches the end of the dataset.
        edges = np.linspace(0, num_rows, rows.size + 1).astype(np.int64)
        assert sorted(np.searchsorted(edges, rows, side="right") - 1) == list(range(rows.size))


def test_sample_line_says_what_was_sampled():
    assert describe_sample(sample_batches(26, 2, 8), 26, 8, seed=0) == (
        "sample: 8 batches of 2 rows, 16 of 26 packed rows: one at random from each of 16 equal "
        "stretches (seed 0); --all for every row"
    )
    assert describe_sample(sample_batches(5, 2, 8), 5, 8, seed=3) == (
        "sample: 2 batches of 2 rows (only 2 fit), 4 of 5 packed rows: one at random from each of 4 equal "
        "stretches (seed 3); --all for every row"
    )
    assert describe_sample(sample_batches(5, 2, None), 5, None, seed=0) == (
        "sample: all 5 packed rows as 2 batches of 2 rows, in random order (seed 0); 1 row left over "
        "(not a full batch)"
    )


def test_plural():
    assert [plural(1, "document"), plural(2, "document"), plural(1, "batch"), plural(3, "batch")] == [
        "1 document", "2 documents", "1 batch", "3 batches",
    ]
    assert plural(2, "row", with_count=False) == "rows"


@pytest.fixture
def corpus(tmp_path):
    """Documents of very different lengths, so the batches differ in their number of documents."""
    rng = np.random.default_rng(0)
    texts = ["x" * int(n) for n in np.clip(rng.lognormal(3.5, 1.2, 120), 1, 400)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path, texts


def record(monkeypatch, name, calls):
    original = getattr(plots, name)

    def wrapper(*args, **kwargs):
        fig = original(*args, **kwargs)
        calls.append((name, args, kwargs, fig.axes[0].get_title()))
        return fig

    monkeypatch.setattr(plots, name, wrapper)


def test_every_table_and_plot_shows_the_batch_it_names(corpus, tmp_path, capsys, monkeypatch):
    path, texts = corpus
    calls = []
    for name in ("plot_rank_work", "plot_shard_map", "plot_doc_lengths"):
        record(monkeypatch, name, calls)
    monkeypatch.setattr(plots, "_finish", lambda fig, path: fig)  # build the figures, skip the slow PNGs
    argv = ["inspect", str(path), "--tokenizer", "bytes", "--seq-len", "128", "--cp", "2", "--batch-size", "2"]
    argv += ["--balancer", "llama3"]  # and llama3_reordered: two shard maps to draw, not four
    assert main([*argv, "--batches", "5", "--json", "--plot", str(tmp_path / "plots"), "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    shown, rows = report["shown_batch"], report["batch_rows"]
    assert shown == int(np.argmax(report["batch_documents"])) and shown != 0  # not simply the first
    label = f"batch {shown} (rows {rows[shown][0]}, {rows[shown][1]})"

    packed, _ = pack_documents(load_documents([path]), PackingConfig(seq_len=128), tokenizer="bytes")
    assert report["sample"]["packed_rows"] == len(packed) and max(sum(rows, [])) >= len(packed) // 2
    row = row_from_instances([packed[i] for i in rows[shown]])
    assert report["batch_documents"][shown] == int(row.real_documents.sum())

    by_name = {}
    for name, args, kwargs, title in calls:
        by_name.setdefault(name, []).append((args, kwargs, title))
    [(args, kwargs, title)] = by_name["plot_rank_work"]
    assert {k: m.to_dict() for k, m in args[0].metrics.items()} == report["batches"][shown]
    assert title.startswith(f"{label}: ")
    assert len(by_name["plot_shard_map"]) == 2
    for args, kwargs, title in by_name["plot_shard_map"]:
        assert f", {label}: which rank holds each token" in title
        assert args[0].cu_doc_lens[-1] == 2 * 128
        if "llama3_reordered" not in title:
            assert args[0].cu_doc_lens.tolist() == row.cu_doc_lens.tolist()
    # The histogram is the corpus before packing (bytes + EOS per document), not the batch's pieces.
    [(args, kwargs, title)] = by_name["plot_doc_lengths"]
    assert sorted(np.asarray(args[0]).tolist()) == sorted(len(t) + 1 for t in texts)
    assert title.startswith(f"corpus before packing: {len(texts)} documents, median ")

    # The text report of every row says so, and names the batch its per-rank tables show.
    assert main([*argv, "--all", "--no-progress"]) == 0
    out = capsys.readouterr().out
    n = len(packed)
    assert f"\nsample: all {n} packed rows as {n // 2} batches of 2 rows, in random order (seed 0)" in out
    assert f"{n // 2} batches of 2 x 128 tokens" in out
    assert "the most of any batch inspected; per rank:" in out


def test_shard_map_plot_labels_row_padding_and_draws_only_real_padding():
    ids = torch.tensor([5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0])
    mask = ids != 0
    instance = dict(input_ids=ids, doc_lens=torch.tensor([5, 7, 4]), label_mask=mask)
    # llama3 over 16 tokens and W=2 adds no padding: no padding row is drawn.
    fig = plots.plot_shard_map(shard_map([instance], "llama3", 2), title="llama3, batch 0")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "row padding"]
    assert ax.get_title() == "llama3, batch 0: which rank holds each token, W=2"
    # zig_zag pads each document to a multiple of 2W = 4 (3 + 1 + 0 slots); rank 0 keeps the last
    # chunk of each, rank 1 the one before: 3 and 1 slots.
    smap = shard_map([instance], "zig_zag", 2)
    fig = plots.plot_shard_map(smap)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "row padding", "balancer padding"]
    widths = [p.get_width() for p in ax.patches if round(p.get_y() + p.get_height() / 2) == 3]
    assert widths == smap.padding.tolist() == [3, 1]
    for fig in (fig, plots.plot_rank_work(compare_balancers([instance], 2))):
        fig.draw_without_rendering()
        ax = fig.axes[0]
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1  # beside the bars


def test_demo_bars_do_not_nest_off_a_terminal_and_settings_repeat_the_run(capsys, monkeypatch):
    import datasets
    from tqdm.auto import tqdm

    import cp_data.datasets

    def tiny_corpus(kind, tokenizer):
        for _ in tqdm(range(3), desc="inner"):  # what datasets' own bars do inside the demo
            pass
        return datasets.Dataset.from_dict({"input_ids": [list(range(1, n)) for n in (30, 9, 60, 5, 17, 44)]})

    monkeypatch.setattr(cp_data.datasets, "load_default_corpus", tiny_corpus)
    argv = ["demo", "--tokenizer", "bytes", "--seq-len", "32", "--cp", "2", "--batch-size", "1"]
    argv += ["--batches", "3"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "inner" in err and "\x1b[A" not in err  # stderr is not a terminal here
    settings = next(line for line in out.splitlines() if line.startswith("settings: "))
    again = vars(build_parser().parse_args(["demo", *settings.removeprefix("settings: ").split()]))
    given = vars(build_parser().parse_args(argv))
    assert {k: again[k] for k in (*SETTINGS, "all")} == {k: given[k] for k in (*SETTINGS, "all")}
    assert "--packing bfd" in settings  # a default, printed too
    assert "\nworst batch: " in out and "\nllama3_reordered: llama3 after reordering" in out
