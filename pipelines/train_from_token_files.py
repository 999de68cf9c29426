"""Convert the embedded corpus to every token-file format, read each back, train the tiny CP model.

1. The embedded corpus (Python's help topics, byte tokenizer: ids 1..256, EOS = 0 ends every
   document) is written with cp-data's writers as: an OLMo-core numpy array with its ``.csv.gz``
   sidecar (uint16), a bare numpy array found by EOS scan (uint32), a nanoGPT ``.bin``, a
   Megatron ``.idx``/``.bin`` and an llm.c GPT-2 shard.
2. Each is opened with ``open_token_files`` (vocab_size checked) and must give back every
   document, and the very packed rows that packing the Hugging Face dataset gives.
3. The tiny transformer of ``train_tiny_cp.py`` trains on the packed rows of one format (all with
   ``--train-from all``) with CP=1 and CP=W for every balancer; CP must equal CP=1.

    python pipelines/train_from_token_files.py              # spawns 4 gloo processes
    python pipelines/train_from_token_files.py --out data/  # keep the token files

Exits non-zero when a format disagrees with the corpus or CP training differs from CP=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned ranks import train_tiny_cp by name
import train_tiny_cp  # noqa: E402

from cp_data.datasets import PackedDataset, load_default_corpus, open_token_files  # noqa: E402
from cp_data.packing import PackingConfig  # noqa: E402
from cp_data.sources import write_llmc, write_megatron, write_numpy  # noqa: E402

VOCAB = 257  # the byte tokenizer: 256 bytes + EOS
EOS = 0


def write_formats(docs: list[np.ndarray], out: Path) -> dict[str, tuple[str, dict]]:
    """Write ``docs`` in every format; return, per format, the path to open and its arguments."""
    write_numpy(out / "olmo.npy", docs, "uint16", sidecar=True)
    write_numpy(out / "scan.npy", docs, "uint32")
    write_numpy(out / "nanogpt.bin", docs, "uint16")
    write_megatron(out / "megatron", docs, "uint16")
    write_llmc(out / "llmc.bin", docs, "gpt-2")
    return {
        "numpy + sidecar": (str(out / "olmo.npy"), dict(dtype="uint16")),
        "numpy, EOS scan": (str(out / "scan.npy"), dict(dtype="uint32", eos_token_id=EOS)),
        "nanogpt": (str(out / "nanogpt.bin"), dict(eos_token_id=EOS)),
        "megatron": (str(out / "megatron.idx"), {}),
        # llm.c puts GPT-2's EOT before each document; this corpus ends them with EOS instead
        "llmc": (str(out / "llmc.bin"), dict(eos_token_id=EOS)),
    }


def same_rows(a: PackedDataset, b: PackedDataset) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(x[k], y[k]) for k in y) for x, y in ((a[i], b[i]) for i in range(len(b)))
    )


def check_formats(corpus, docs, formats: dict, config: PackingConfig) -> tuple[dict, list[str]]:
    """Open every format; the packed datasets and one line per format saying what matched."""
    reference = PackedDataset(corpus, config)
    packed, lines = {}, []
    for name, (path, kwargs) in tqdm(formats.items(), desc="check formats", leave=False):
        source = open_token_files(path, vocab_size=VOCAB, **kwargs)
        docs_equal = len(source) == len(docs) and all(np.array_equal(source[i], d) for i, d in enumerate(docs))
        packed[name] = PackedDataset(source, config)
        rows_equal = same_rows(packed[name], reference)
        lines.append(
            f"{name:<16} {source.files[0].format:<9} {len(source):>6} docs {source.num_tokens:>9,} tokens  "
            f"documents equal: {docs_equal}  packed rows equal to the HF dataset's: {rows_equal}"
        )
        if not (docs_equal and rows_equal):
            lines[-1] += "  <- MISMATCH"
    return packed, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for the token files (default: a temporary one)")
    parser.add_argument("--corpus", choices=["pydoc", "stdlib", "both"], default="pydoc")
    parser.add_argument("--spawn", type=int, default=4, help="CP degree W (gloo processes)")
    parser.add_argument("--train-from", default="megatron", help="format to train from, or 'all'")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args(argv)
    corpus = load_default_corpus(args.corpus, "bytes")
    docs = [np.asarray(d, dtype=np.int64) for d in corpus["input_ids"]]
    config = PackingConfig(args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        formats = write_formats(docs, out)
        packed, lines = check_formats(corpus, docs, formats, config)
        print(f"embedded corpus '{args.corpus}': {len(docs)} documents, {sum(map(len, docs)):,} tokens -> {out}")
        print("\n".join(lines))
        ok = not any("MISMATCH" in line for line in lines)
        names = list(formats) if args.train_from == "all" else [args.train_from]
        unknown = [n for n in names if n not in formats]
        if unknown:
            parser.error(f"--train-from {unknown[0]!r}: choose one of {list(formats)} or 'all'")
        cfg = dict(vocab=VOCAB, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size)
        for name in names:
            results = train_tiny_cp.run(args.spawn, packed[name], **cfg)
            table, trained = train_tiny_cp.report(results, train_tiny_cp.TinyConfig(**cfg), args.spawn)
            print(f"\ntrained from the {name} files:\n{table}")
            ok = ok and trained
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
