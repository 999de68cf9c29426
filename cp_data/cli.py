"""The ``cp-data`` command: ``demo``, ``inspect`` and ``bench``.

Bad arguments, missing files and invalid input end with one ``cp-data: error: ...`` line on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import sys
from pathlib import Path
from typing import Any, Sequence

from cp_data.balancers import RingAttentionLoadBalancerType

__all__ = ["main", "build_parser"]

BALANCERS = [k.value for k in RingAttentionLoadBalancerType]

QUICK_BENCH_KWARGS = {
    "balancers": dict(num_tokens=8192, num_docs=128, world_size=4, repeats=3),
    "collate": dict(batch_size=2, seq_len=2048, docs_per_row=20, cp_world_size=4, repeats=3),
    "packing": dict(num_docs=20_000, dataset_tokens=500_000, progress=False),
    "ordering": dict(num_rows=20, num_batches=2, progress=False),
    "tokenfiles": dict(num_tokens=20_000_000, num_docs=200_000, rows=500, progress=False),
    "dp": dict(seq_lens=(131072,), dp_sizes=(64,), batch_sizes=(4,), num_rows=512, corpus="pydoc", progress=False),
}
"""Small sizes for ``cp-data bench --quick`` (only the keywords a module's ``run`` accepts are used)."""

BENCH_ORDER = ("balancers", "packing", "collate", "ordering", "tokenfiles", "dp")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"cp-data: error: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _shared(p: argparse.ArgumentParser, seq_len: int, batches: int, batch_size: int) -> None:
    p.add_argument("--cp", type=_positive, default=4, metavar="W", help="context-parallel degree (default 4)")
    p.add_argument(
        "--seq-len",
        type=_positive,
        default=seq_len,
        metavar="S",
        help=f"packed row length (default {seq_len})",
    )
    p.add_argument(
        "--balancer", choices=BALANCERS + ["all"], default="all", help="balancer to show (default all)"
    )
    sample = p.add_mutually_exclusive_group()
    sample.add_argument(
        "--batches",
        type=_positive,
        default=batches,
        metavar="N",
        help=f"batches to inspect, their rows spread over the whole packed dataset (default {batches})",
    )
    sample.add_argument("--all", action="store_true", help="inspect every batch of the packed dataset")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the rows drawn into the batches (default 0)"
    )
    p.add_argument(
        "--batch-size",
        type=_positive,
        default=batch_size,
        metavar="B",
        help=f"packed rows per batch, flattened into one row (default {batch_size})",
    )
    p.add_argument(
        "--length-multiple",
        type=_positive,
        default=None,
        metavar="M",
        help="pad shards to a multiple of M (as the collator's length_multiple)",
    )
    p.add_argument(
        "--packing", choices=["bfd", "concat"], default="bfd", help="packing algorithm (default bfd)"
    )
    p.add_argument(
        "--cp-multiple",
        type=_positive,
        default=None,
        metavar="M",
        help="CP-aware packing: pad every document to a multiple of M (e.g. 2W for zig_zag)",
    )
    p.add_argument(
        "--tokenizer",
        choices=["bpe", "bytes"],
        default="bpe",
        help="local byte-level BPE (trained on the pydoc topics) or raw bytes (default bpe)",
    )
    p.add_argument(
        "--dp", type=_positive, default=4, metavar="D", help="data-parallel size of the DP balance report (default 4; 1: none)"
    )
    p.add_argument("--plot", metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _token_file_flags(p: argparse.ArgumentParser) -> None:
    from cp_data.sources.raw import TOKEN_DTYPES

    p.add_argument("--dtype", choices=TOKEN_DTYPES, help="token dtype of headerless token files (.npy, .bin)")
    p.add_argument("--eos-id", type=int, metavar="ID", help="EOS id delimiting documents in token files")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cp-data``."""
    parser = _Parser(prog="cp-data", description="See how packed documents land on context-parallel ranks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="embedded corpus -> pack -> shard for W ranks -> metrics")
    demo.add_argument(
        "--corpus",
        choices=["pydoc", "stdlib", "both"],
        default="pydoc",
        help="embedded corpus: Python's help topics, its stdlib .py files, or both",
    )
    demo.add_argument("--source", metavar="PATH", help="token files (numpy/Megatron/nanoGPT/llm.c) instead of a corpus")
    _token_file_flags(demo)
    _shared(demo, seq_len=4096, batches=8, batch_size=2)
    insp = sub.add_parser("inspect", help="metrics for your own files or saved HF dataset")
    insp.add_argument(
        "paths",
        nargs="+",
        help=".txt/.jsonl/.json/.parquet files, directories, a saved dataset dir, or token files "
        "(.npy/.bin/.idx: numpy, Megatron, nanoGPT, llm.c)",
    )
    insp.add_argument("--text-column", default="text", help="column holding the text (default 'text')")
    insp.add_argument("--doc-per-file", action="store_true", help="one document per text file, not per line")
    _token_file_flags(insp)
    _shared(insp, seq_len=8192, batches=4, batch_size=1)
    bench = sub.add_parser("bench", help="run the benchmarks and print their ratios")
    bench.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all: {', '.join(BENCH_ORDER)})"
    )
    bench.add_argument("--quick", action="store_true", help="small sizes (seconds, not minutes)")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def _kinds(args: argparse.Namespace) -> list[str]:
    return BALANCERS if args.balancer == "all" else [args.balancer]


SETTINGS = (
    "cp", "seq_len", "batch_size", "batches", "packing", "cp_multiple", "length_multiple", "tokenizer", "seed"
)
"""The options that shape a report; its ``settings:`` line repeats them, defaults included."""


def _settings(args: argparse.Namespace) -> str:
    """The options of this run as command-line flags (demo and inspect have different defaults)."""
    flags = [
        f"--{k.replace('_', '-')} {getattr(args, k)}"
        for k in SETTINGS
        if getattr(args, k) is not None and not (k == "batches" and args.all)
    ]
    return "settings: " + " ".join(flags + (["--all"] if args.all else []))


def _report(args: argparse.Namespace, packed: Any, decode: Any, header: str) -> None:
    from cp_data.inspect.metrics import plural
    from cp_data.inspect.report import inspect_batches, render_rank_table, save_plots, shard_previews
    from cp_data.inspect.sources import describe_sample, sample_batches

    rows = sample_batches(len(packed), args.batch_size, None if args.all else args.batches, seed=args.seed)
    if not rows:
        raise ValueError(
            f"only {plural(len(packed), 'packed row')} of {args.seq_len} tokens: not enough for one batch of "
            f"{args.batch_size}; lower --batch-size or --seq-len"
        )
    report = inspect_batches(
        ([packed[i] for i in r] for r in rows),
        args.cp,
        _kinds(args),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        length_multiple=args.length_multiple,
        rows=rows,
        total=len(rows),
        progress=not args.no_progress,
    )
    report.packing = packed.metrics()
    # Show the ranks of the batch with the most documents: where balancers differ most.
    shown = report.busiest_batch()
    instances = [packed[i] for i in rows[shown]]
    comparison = report.comparisons[shown]
    previews = shard_previews(
        instances, args.cp, comparison.metrics, decode, length_multiple=args.length_multiple
    )
    dp, dp_rows = None, args.dp * args.batch_size
    if args.dp > 1 and len(packed) >= dp_rows:
        from cp_data.inspect.dp import dp_report

        dp = dp_report(packed, dp_world_size=args.dp, batch_size=args.batch_size, cp_world_size=args.cp,
                       balancer=_kinds(args)[0], length_multiple=args.length_multiple, steps=args.batches,
                       progress=not args.no_progress)
    plots = []
    if args.plot:
        from cp_data.inspect.plots import use_file_backend

        use_file_backend()
        plots = save_plots(report, args.plot, shown, instances, corpus_doc_lens=packed.store.lengths)
        if dp is not None:
            from cp_data.inspect.dp import plot_dp_work

            plots.append(Path(args.plot) / "dp_work.png")
            plot_dp_work(dp, plots[-1])
    if args.json:
        out = report.to_dict()
        out.update(
            sample=dict(all=args.all, seed=args.seed, packed_rows=len(packed)),
            shown_batch=shown,
            previews=previews,
            plots=[str(p) for p in plots],
            dp=dp.to_dict() if dp is not None else None,
        )
        print(json.dumps(out, indent=1))
        return
    print(header)
    print(_settings(args))
    print(describe_sample(rows, len(packed), None if args.all else args.batches, seed=args.seed))
    print(report.render())
    label = report.batch_label(shown)
    documents = plural(report.documents[shown], "document")
    print(f"\n{label}: {documents}, the most of any batch inspected; per rank:")
    print(comparison.render())
    for name, m in comparison.metrics.items():
        print()
        print(render_rank_table(m, previews[name]))
    if dp is not None:
        print()
        print(dp.render())
    elif args.dp > 1:
        print(f"\nno DP balance report: dp x batch_size = {dp_rows} rows, only {len(packed)} packed")
    for p in plots:
        shows = {
            "doc_lengths.png": "the corpus's document lengths before packing",
            "dp_work.png": "per-DP-rank work per step, before and after DP balancing",
        }.get(p.name, label)
        print(f"wrote {p}: {shows}")


def _packing_config(args: argparse.Namespace):
    from cp_data.packing import PackingConfig

    return PackingConfig(seq_len=args.seq_len, algorithm=args.packing, cp_multiple=args.cp_multiple)


def _hide_progress() -> None:
    """``--no-progress`` beyond our own bars (those take ``disable=`` directly): datasets' bars."""
    # tqdm reads TQDM_DISABLE when it is imported, long done here: this reaches child processes.
    os.environ["TQDM_DISABLE"] = "1"
    import datasets

    datasets.disable_progress_bars()


def _report_token_files(args: argparse.Namespace, paths: list[str]) -> None:
    """Pack token files as they are (no tokenizer: previews show ids) and report."""
    from cp_data.datasets import PackedDataset, open_token_files
    from cp_data.inspect.sources import describe_packing

    source = open_token_files(paths, dtype=args.dtype, eos_token_id=args.eos_id)
    packed = PackedDataset(source, _packing_config(args))
    _report(args, packed, None, f"{' '.join(paths)}: {describe_packing(packed)}")


def _demo(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    if args.source:
        return _report_token_files(args, [args.source])

    from cp_data.datasets import PackedDataset, get_tokenizer, load_default_corpus
    from cp_data.inspect.sources import describe_packing

    # Off a terminal, nested bars (datasets' own run inside this one) print raw cursor escapes.
    outer = not args.no_progress and sys.stderr.isatty()
    with tqdm(total=3, desc="demo", disable=not outer) as bar:
        bar.set_postfix_str(f"corpus {args.corpus}")
        corpus = load_default_corpus(args.corpus, args.tokenizer)
        bar.update()
        bar.set_postfix_str("pack")
        packed = PackedDataset(corpus, _packing_config(args))
        bar.update()
        tokenizer = get_tokenizer(args.tokenizer)
        bar.update()
    header = f"embedded corpus '{args.corpus}': {describe_packing(packed)}; CP degree {args.cp}"
    _report(args, packed, tokenizer.decode, header)


@contextlib.contextmanager
def _quiet_datasets_log():
    from datasets.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _inspect(args: argparse.Namespace) -> None:
    from cp_data.inspect.sources import describe_packing, load_documents, pack_documents
    from cp_data.sources import is_token_path

    if all(map(is_token_path, args.paths)):
        return _report_token_files(args, args.paths)
    name = " ".join(args.paths)
    with _quiet_datasets_log():  # datasets logs a read failure that our one error line repeats
        dataset = load_documents(args.paths, doc_per_file=args.doc_per_file)
    packed, tokenizer = pack_documents(
        dataset, _packing_config(args), tokenizer=args.tokenizer, text_column=args.text_column, name=name
    )
    decode = tokenizer.decode if tokenizer is not None else None
    _report(args, packed, decode, f"{name}: {describe_packing(packed)}")


def _bench_modules() -> list[str]:
    import cp_data.bench

    found = {m.name for m in pkgutil.iter_modules(cp_data.bench.__path__) if not m.name.startswith("_")}
    return [n for n in BENCH_ORDER if n in found] + sorted(found - set(BENCH_ORDER))


def _load_bench(name: str):
    return importlib.import_module(f"cp_data.bench.{name}")


def _flatten(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        return [line for k, v in value.items() for line in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [f"  {prefix}: {value:.4g}" if isinstance(value, float) else f"  {prefix}: {value}"]


def _bench(args: argparse.Namespace) -> None:
    available = _bench_modules()
    names = args.names or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; available: {', '.join(available)}")
    results = {}
    for name in names:
        module = _load_bench(name)
        run = getattr(module, "run", None)
        if args.quick or args.json:
            if run is None:
                raise ValueError(f"benchmark {name!r} has no run(); run it without --quick/--json")
            accepted = inspect.signature(run).parameters
            kwargs = (
                {k: v for k, v in QUICK_BENCH_KWARGS.get(name, {}).items() if k in accepted}
                if args.quick
                else {}
            )
            results[name] = run(**kwargs)
            if not args.json:
                print(f"{name}:" + ("  (quick sizes)" if kwargs else ""))
                print("\n".join(_flatten("", results[name])))
        else:
            print(f"== {name}")
            module.main()
    if args.json:
        print(json.dumps(results, indent=1, default=float))


COMMANDS = {"demo": _demo, "inspect": _inspect, "bench": _bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cp-data`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    try:
        if getattr(args, "no_progress", False):
            _hide_progress()
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("cp-data: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter flushes it at exit
        return 141
    except (ValueError, OSError, ImportError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"cp-data: error: {message}", file=sys.stderr)
        return 1
    return 0
