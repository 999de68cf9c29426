"""The ``cp-data`` command: outputs, files written, JSON, errors.

Every case runs ``cp_data.cli.main(argv)`` in this process (starting Python and importing torch
costs seconds per case); one smoke test runs the installed console script end to end.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cp_data import cli


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cp_data_cache")


@pytest.fixture(autouse=True)
def _cli_environment(monkeypatch, cache_dir):
    """What ``main`` changes in the process (env vars, datasets' bars) is undone after each case."""
    import datasets

    monkeypatch.setenv("CP_DATA_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")  # --no-progress sets it
    bars = not datasets.utils.are_progress_bars_disabled()
    yield
    if bars:
        datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Small local datasets in every supported format."""
    import datasets

    rng = random.Random(0)
    words = "the of and to in is that for it as with was on be by this are from or an".split()
    texts = [
        " ".join(rng.choice(words) for _ in range(int(rng.lognormvariate(4.0, 1.0)) + 1)) for _ in range(150)
    ]
    root = tmp_path_factory.mktemp("data")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "docs.txt").write_text("\n".join(texts) + "\n")
    ds = datasets.Dataset.from_dict({"body": texts})
    ds.to_parquet(str(root / "docs.parquet"))
    ds.save_to_disk(str(root / "saved"))
    (root / "notes.csv").write_text("a,b\n")
    (root / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (root / "numbers.jsonl").write_text('{"text": 5}\n')
    return root


def run(capsys, args, code=0):
    """``main(args)`` in this process: (stdout, stderr), after checking the exit status."""
    try:
        status = cli.main(args)
    except SystemExit as exit_:  # argparse exits on bad arguments
        status = exit_.code
    out, err = capsys.readouterr()
    assert status == code, err
    return out, err


def test_demo_tables_and_plots(capsys, tmp_path):
    out, err = run(
        capsys, ["demo", "--cp", "2", "--batches", "3", "--seq-len", "2048", "--plot", str(tmp_path), "--no-progress"]
    )
    for name in ("zig_zag", "llama3", "ulysses", "llama3_reordered", "first tokens", "work max/mean"):
        assert name in out
    assert err == ""
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(
        [
            "doc_lengths.png",
            "dp_work.png",
            "rank_work.png",
            "shard_map_zig_zag.png",
            "shard_map_llama3.png",
            "shard_map_ulysses.png",
            "shard_map_llama3_reordered.png",
        ]
    )
    assert all((tmp_path / n).read_bytes()[:4] == b"\x89PNG" for n in written)


def test_demo_json_matches_collated_shards(capsys):
    args = ["demo", "--cp", "4", "--batches", "2", "--batch-size", "2", "--json", "--length-multiple", "8"]
    report = json.loads(run(capsys, args + ["--no-progress"])[0])
    assert report["cp_world_size"] == 4 and report["num_batches"] == 2
    shown = report["batches"][report["shown_batch"]]
    for name, metrics in shown.items():
        previews = report["previews"][name]
        # What the collator hands each rank is exactly the tokens plus padding the metrics count.
        assert [p["local_len"] for p in previews] == [
            t + p for t, p in zip(metrics["tokens"], metrics["padding"])
        ]
        assert all(p["first_text"] is not None for p in previews)
    assert (
        sum(shown["llama3"]["tokens"]) == sum(shown["zig_zag"]["tokens"]) == sum(shown["ulysses"]["tokens"])
    )
    assert report["summary"]["ulysses"]["work_imbalance_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "inputs, extra",
    [
        (["docs.jsonl"], ["--packing", "concat", "--cp-multiple", "8"]),
        (["docs.txt"], ["--tokenizer", "bytes", "--balancer", "llama3"]),
        (["docs.parquet"], ["--text-column", "body"]),
        (["saved"], ["--text-column", "body", "--balancer", "zig_zag"]),
    ],
)
def test_inspect_json(capsys, data_dir, inputs, extra):
    args = ["inspect", *[str(data_dir / i) for i in inputs], "--seq-len", "1024", "--batches", "3", "--json"]
    report = json.loads(run(capsys, args + extra + ["--no-progress"])[0])
    assert report["num_batches"] == 3 and report["seq_len"] == 1024
    expected = {"llama3": ["llama3", "llama3_reordered"], "zig_zag": ["zig_zag"]}.get(
        (extra or [""])[-1], ["zig_zag", "llama3", "ulysses", "llama3_reordered"]
    )
    assert list(report["summary"]) == expected
    W, aligned = 4, "--cp-multiple" in extra  # documents padded to 2W: zig_zag adds nothing
    for batch in report["batches"]:
        for name, m in batch.items():
            held = [t + p for t, p in zip(m["tokens"], m["padding"])]
            assert len(set(held)) == 1, (name, held)  # every rank holds local_len positions
            if name != "zig_zag" or aligned:  # a 1024-token row over 4 ranks: 256 each
                assert held[0] == 1024 // W, (name, held)
            else:  # zig_zag pads every document to a multiple of 2W
                assert held[0] >= 1024 // W, held
            assert m["work_imbalance"] == pytest.approx(max(m["work"]) / (sum(m["work"]) / W))
        assert len({sum(m["tokens"]) for m in batch.values()}) == 1  # one batch, the same tokens
    shown = report["batches"][report["shown_batch"]]
    for name, previews in report["previews"].items():
        assert [p["local_len"] for p in previews] == [t + p for t, p in zip(shown[name]["tokens"], shown[name]["padding"])]


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["inspect", "missing.jsonl"], "no such file or directory: missing.jsonl", 1),
        (
            ["inspect", "{data}/docs.jsonl", "--cp", "0"],
            "argument --cp: expected a positive integer, got 0",
            2,
        ),
        (["inspect", "{data}/docs.jsonl", "--balancer", "ring"], "invalid choice: 'ring'", 2),
        (["inspect", "{data}/notes.csv"], "unsupported file type '.csv'", 1),
        (["inspect", "{data}/docs.jsonl", "--text-column", "body"], "column 'body' not found", 1),
        (["inspect", "{data}/broken.jsonl"], "cannot read {data}/broken.jsonl as json: JSON parse error", 1),
        (["inspect", "{data}/numbers.jsonl"], "column 'text' holds Value('int64'), not text", 1),
        (["inspect", "{data}/docs.jsonl", "--batch-size", "1000"], "not enough for one batch", 1),
        (["inspect", "{data}/docs.jsonl", "--cp-multiple", "7"], "cp_multiple=7 does not divide", 1),
        (["bench", "nope"], "unknown benchmark 'nope'", 1),
        (["frobnicate"], "invalid choice: 'frobnicate'", 2),
    ],
)
def test_errors_are_one_line(capsys, data_dir, args, message, code):
    args = [a.format(data=data_dir) for a in args] + (["--no-progress"] if args[0] == "inspect" else [])
    out, err = run(capsys, args, code)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cp-data: error:"), err
    assert message.format(data=data_dir) in lines[0]
    assert out == ""


def test_bench_json(capsys, monkeypatch):
    # The quick sizes still take seconds; the command's plumbing needs only a few rows.
    monkeypatch.setitem(cli.QUICK_BENCH_KWARGS, "ordering", dict(num_rows=4, num_batches=1, batch_size=2, progress=False))
    result = json.loads(run(capsys, ["bench", "ordering", "--quick", "--json"])[0])["ordering"]
    assert len(result) >= 6  # every mix on rows and on flattened batches
    for case, mix in result.items():
        assert mix["rows"] == (1 if "batches" in case else 4), case
        assert mix["after"] < mix["before"]
        assert mix["bound"] <= mix["after"] + 1e-9


def test_bench_table(capsys):
    out, _ = run(capsys, ["bench", "balancers", "--quick"])
    assert out.startswith("balancers:  (quick sizes)\n") and "speedup_vs_upstream_loop" in out


def test_console_script_end_to_end(data_dir, cache_dir):
    """The installed ``cp-data`` (next to this Python, as pip puts it) in a fresh process."""
    exe = Path(sys.executable).parent / ("cp-data.exe" if os.name == "nt" else "cp-data")
    assert exe.is_file(), f"no cp-data console script next to {sys.executable}: pip install -e '.[dev]'"
    args = ["inspect", str(data_dir / "docs.jsonl"), "--cp", "2", "--seq-len", "512", "--batches", "2"]
    env = dict(os.environ, CP_DATA_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([str(exe), *args, "--no-progress"], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "mean over the 2 batches" in proc.stdout and "llama3_reordered" in proc.stdout
