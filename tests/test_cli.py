"""The ``cp-data`` command, run in subprocesses: outputs, files written, JSON, errors."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

PYTHON_M = [sys.executable, "-m", "cp_data"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cp_data_cache")
    return dict(os.environ, CP_DATA_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


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


def run(args, env, ok=True):
    proc = subprocess.run(
        PYTHON_M + [*args, "--no-progress"] if args[0] != "bench" else PYTHON_M + args,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_demo_tables_and_plots(env, tmp_path):
    proc = run(["demo", "--cp", "2", "--batches", "3", "--seq-len", "2048", "--plot", str(tmp_path)], env)
    out = proc.stdout
    for name in ("zig_zag", "llama3", "ulysses", "llama3_reordered", "first tokens", "work max/mean"):
        assert name in out
    assert "Traceback" not in proc.stderr
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


def test_demo_json_matches_collated_shards(env):
    proc = run(
        ["demo", "--cp", "4", "--batches", "2", "--batch-size", "2", "--json", "--length-multiple", "8"], env
    )
    report = json.loads(proc.stdout)
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
def test_inspect_json(env, data_dir, inputs, extra):
    proc = run(
        [
            "inspect",
            *[str(data_dir / i) for i in inputs],
            "--seq-len",
            "1024",
            "--batches",
            "3",
            "--json",
            *extra,
        ],
        env,
    )
    report = json.loads(proc.stdout)
    assert report["num_batches"] == 3 and report["seq_len"] == 1024
    expected = {"llama3": ["llama3", "llama3_reordered"], "zig_zag": ["zig_zag"]}.get(
        (extra or [""])[-1], ["zig_zag", "llama3", "ulysses", "llama3_reordered"]
    )
    assert list(report["summary"]) == expected
    for batch in report["batches"]:
        for m in batch.values():
            # Every position of the 1024-token row is a token or instance padding on some rank.
            assert sum(m["tokens"]) + sum(m["padding"]) >= 1024
            assert m["work_imbalance"] == pytest.approx(max(m["work"]) / (sum(m["work"]) / 4))


def test_inspect_table_with_console_script(env, data_dir, tmp_path):
    exe = shutil.which("cp-data")
    if exe is None:
        pytest.skip("cp-data console script not installed")
    proc = subprocess.run(
        [
            exe,
            "inspect",
            str(data_dir / "docs.jsonl"),
            "--cp",
            "2",
            "--seq-len",
            "512",
            "--batches",
            "2",
            "--plot",
            str(tmp_path / "plots"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mean over batches" in proc.stdout and "llama3_reordered" in proc.stdout
    assert (tmp_path / "plots" / "rank_work.png").exists()


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
def test_errors_are_one_line(env, data_dir, args, message, code):
    args = [a.format(data=data_dir) for a in args]
    message = message.format(data=data_dir)
    proc = subprocess.run(PYTHON_M + args, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == code
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("cp-data: error:") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_quick_json(env):
    proc = run(["bench", "ordering", "--quick", "--json"], env)
    result = json.loads(proc.stdout)["ordering"]
    assert len(result) >= 3
    for mix in result.values():
        assert mix["after"] < mix["before"]
        assert mix["bound"] <= mix["after"] + 1e-9


def test_bench_quick_table(env):
    proc = run(["bench", "balancers", "--quick"], env)
    assert "balancers:" in proc.stdout and "speedup_vs_upstream_loop" in proc.stdout
