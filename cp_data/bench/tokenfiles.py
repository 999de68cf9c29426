"""Token-file benchmark: document discovery, BFD planning, row assembly and memory at scale.

A uint16 corpus of ``num_tokens`` tokens in ``num_docs`` long-tailed, EOS-ended documents is
written to a temporary directory (2 GB for the default 1e9 tokens; the free space is checked
first), plus a Megatron index of the same tokens (its ``.bin`` is a hard link). Then:

- discovery: the EOS scan (``scan_offsets``) vs ``np.flatnonzero(tokens == eos)`` over the
  mapped file, the physical floor (target: scan <= 1.5x it); opening from the Megatron index and
  from the scan's cache (neither reads the tokens);
- BFD planning of ``PackedDataset(source, seq_len)`` over the lengths (target >= 1e6 docs/s);
- row assembly: ``PackedDataset.row`` on random rows from the mapped file (target >= 1e8
  tokens/s; the median row time, robust to a busy machine), next to the copy floor (one
  ``seq_len`` slice per row into an int64 array);
- memory in a fresh process: anonymous resident memory (``RssAnon``: what is not page cache)
  after opening the source, after planning, and its peak (target: source <= 200 MB).

Rates are best-of-rounds; ratios are taken within the run, so a busy machine shifts them less.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from cp_data.bench.balancers import long_tailed_doc_lens, seconds_per_call
from cp_data.packing import PackingConfig
from cp_data.sources import open_token_files, scan_offsets
from cp_data.sources.write import write_megatron_index

TARGET_SCAN_VS_FLOOR = 1.5
TARGET_BFD_DOCS_PER_S = 1e6
TARGET_ROW_TOKENS_PER_S = 1e8
TARGET_SOURCE_MB = 200
EOS = 0
VOCAB = 50_000
CHUNK = 1 << 24


def write_corpus(path: Path, lengths: np.ndarray, seed: int = 0, progress: bool = True) -> None:
    """Random uint16 ids in [1, VOCAB) with an EOS at the last token of every document."""
    rng = np.random.default_rng(seed)
    ends = np.cumsum(lengths)
    n = int(ends[-1])
    with open(path, "wb") as f:
        for lo in tqdm(range(0, n, CHUNK), desc="write corpus", leave=False, disable=not progress):
            hi = min(n, lo + CHUNK)
            block = rng.integers(1, VOCAB, hi - lo, dtype=np.uint16)
            inside = ends[np.searchsorted(ends, lo, "right") : np.searchsorted(ends, hi, "right")]
            block[inside - 1 - lo] = EOS
            block.tofile(f)


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise OSError("no RssAnon in /proc/self/status (Linux only)")


def _memory_child(path: str, seq_len: int, rows: int, out) -> None:
    """Anonymous RSS (MB, above the process's baseline) after each step, and the sampled peak."""
    from cp_data.datasets import PackedDataset

    base = _rss_anon_mb()
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_anon_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    source = open_token_files(path, dtype="uint16", eos_token_id=EOS, cache=False)
    after_open = _rss_anon_mb()
    packed = PackedDataset(source, PackingConfig(seq_len))
    after_plan = _rss_anon_mb()
    for r in np.random.default_rng(0).integers(0, len(packed), rows).tolist():
        packed.row(r)
    after_rows = _rss_anon_mb()
    done.set()
    thread.join()
    out.put({
        "source_mb": after_open - base,
        "source_and_plan_mb": after_plan - base,
        "after_rows_mb": after_rows - base,
        "peak_mb": max(peak[0], after_rows) - base,
        "pieces": int(packed.plan.doc.size),
    })


def _memory(path: Path, seq_len: int, rows: int) -> dict:
    ctx = mp.get_context("spawn")  # a clean process: nothing of the parent's heap is counted
    out = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(str(path), seq_len, rows, out))
    proc.start()
    result = out.get(timeout=3600)
    proc.join()
    return result


def _median_seconds(calls) -> float:
    """Median seconds of one call (each timed alone, after one untimed pass over all of them).

    The median, not the mean: on a shared machine a few calls absorb whole scheduler time slices.
    """
    for fn in calls:
        fn()
    times = []
    for fn in calls:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _check_disk(directory: Path, need: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < need * 1.2:
        raise ValueError(
            f"{directory} has {free / 1e9:.1f} GB free; this size needs {need / 1e9:.1f} GB: pass fewer "
            "tokens (python -m cp_data.bench.tokenfiles --tokens 2e8 --docs 2e6) or another --dir"
        )


def run(
    num_tokens: int = 1_000_000_000,
    num_docs: int = 10_000_000,
    seq_len: int = 8192,
    rows: int = 2000,
    directory: Optional[str] = None,
    memory: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Measure everything above on a generated corpus (deleted afterwards)."""
    from cp_data.datasets import PackedDataset

    num_tokens, num_docs = int(num_tokens), int(num_docs)
    root = Path(directory or tempfile.gettempdir())
    _check_disk(root, num_tokens * 2 + num_docs * 20)
    steps = tqdm(total=6, desc="tokenfiles bench", disable=not progress)
    with tempfile.TemporaryDirectory(dir=root, prefix="cp_data_bench_") as tmp:
        tmp = Path(tmp)
        lengths = long_tailed_doc_lens(num_tokens, num_docs, seed)
        path = tmp / "tokens.npy"
        write_corpus(path, lengths, seed, progress)
        os.link(path, tmp / "tokens_megatron.bin")
        write_megatron_index(tmp / "tokens_megatron.idx", lengths, np.uint16)
        steps.update()

        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        floor_s = seconds_per_call(lambda: np.flatnonzero(tokens == EOS), rounds=2)
        scan_s = seconds_per_call(lambda: scan_offsets(tokens, EOS), rounds=2)
        del tokens
        steps.update()

        index_s = seconds_per_call(lambda: open_token_files(tmp / "tokens_megatron.idx"), rounds=2)
        cache = tmp / "cache"
        start = time.perf_counter()
        source = open_token_files(path, dtype="uint16", eos_token_id=EOS, cache=cache)
        first_open_s = time.perf_counter() - start
        cached_s = seconds_per_call(lambda: open_token_files(path, dtype="uint16", eos_token_id=EOS, cache=cache), rounds=2)
        if not np.array_equal(source.doc_lens, lengths):
            raise RuntimeError("the scanned document lengths differ from the written ones")
        steps.update()

        start = time.perf_counter()
        packed = PackedDataset(source, PackingConfig(seq_len))
        plan_s = time.perf_counter() - start
        steps.update()

        picks = np.random.default_rng(seed).integers(0, len(packed), rows).tolist()
        row_s = _median_seconds([lambda r=r: packed.row(r) for r in picks])
        mapped = np.memmap(path, dtype=np.uint16, mode="r")
        starts = np.random.default_rng(seed).integers(0, num_tokens - seq_len, rows).tolist()
        out = np.empty(seq_len, dtype=np.int64)

        def copy(s: int) -> None:
            out[:] = mapped[s : s + seq_len]

        copy_s = _median_seconds([lambda s=s: copy(s) for s in starts])
        pieces_per_row = packed.plan.doc.size / len(packed)
        del packed, source, mapped
        steps.update()
        mem = _memory(path, seq_len, min(rows, 500)) if memory else {}
        steps.update()
    steps.close()
    scan_ratio = scan_s / floor_s
    bfd_rate = num_docs / plan_s
    row_rate = seq_len / row_s
    ok = scan_ratio <= TARGET_SCAN_VS_FLOOR and bfd_rate >= TARGET_BFD_DOCS_PER_S and row_rate >= TARGET_ROW_TOKENS_PER_S
    if mem:
        ok = ok and mem["source_mb"] <= TARGET_SOURCE_MB
    return {
        "num_tokens": num_tokens,
        "num_docs": num_docs,
        "seq_len": seq_len,
        "floor_tokens_per_s": num_tokens / floor_s,
        "scan_tokens_per_s": num_tokens / scan_s,
        "scan_vs_floor": scan_ratio,
        "first_open_s": first_open_s,
        "index_open_s": index_s,
        "cached_open_s": cached_s,
        "index_vs_floor": index_s / floor_s,
        "bfd_docs_per_s": bfd_rate,
        "rows": len(picks),
        "pieces_per_row": pieces_per_row,
        "row_tokens_per_s": row_rate,
        "copy_floor_tokens_per_s": seq_len / copy_s,
        "row_vs_copy_floor": row_s / copy_s,
        "memory": mem,
        "ok": bool(ok),
    }


def main(argv: Optional[list[str]] = None) -> dict:
    """Print the figures against the targets (``argv``: --tokens, --docs, --seq-len, --rows, --dir)."""
    parser = argparse.ArgumentParser(prog="python -m cp_data.bench.tokenfiles", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--docs", type=float, default=1e7)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--dir", default=None, help="where the corpus is written (default: the temp dir)")
    args = parser.parse_args(argv or [])
    r = run(args.tokens, args.docs, args.seq_len, args.rows, args.dir)
    print(f"corpus: {r['num_tokens']:,} uint16 tokens in {r['num_docs']:,} documents, S = {r['seq_len']}")
    print(f"EOS scan:       {r['scan_tokens_per_s']:>14,.0f} tokens/s = {r['scan_vs_floor']:.2f}x the time of "
          f"np.flatnonzero(tokens == eos) ({r['floor_tokens_per_s']:,.0f} tokens/s; target <= {TARGET_SCAN_VS_FLOOR}x)")
    print(f"open: first (scan + cache write) {r['first_open_s']:.2f} s, from the cache {r['cached_open_s']:.3f} s, "
          f"from a Megatron index {r['index_open_s']:.3f} s ({r['index_vs_floor']:.3f}x the floor scan)")
    print(f"BFD plan:       {r['bfd_docs_per_s']:>14,.0f} docs/s  (target >= {TARGET_BFD_DOCS_PER_S:,.0f})")
    print(f"row assembly:   {r['row_tokens_per_s']:>14,.0f} tokens/s (target >= {TARGET_ROW_TOKENS_PER_S:,.0f}); "
          f"{r['row_vs_copy_floor']:.1f}x the time of one {r['seq_len']}-token copy per row "
          f"({r['copy_floor_tokens_per_s']:,.0f} tokens/s); {r['pieces_per_row']:.0f} pieces per row")
    m = r["memory"]
    if m:
        print(f"memory beyond the page cache (RssAnon): source {m['source_mb']:.0f} MB "
              f"(target <= {TARGET_SOURCE_MB}), source + BFD plan {m['source_and_plan_mb']:.0f} MB "
              f"({m['pieces']:,} pieces), after {min(r['rows'], 500)} rows {m['after_rows_mb']:.0f} MB, "
              f"peak {m['peak_mb']:.0f} MB")
    print("all targets met" if r["ok"] else "TARGET MISSED")
    return r


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
