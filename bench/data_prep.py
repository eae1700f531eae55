"""Token preparation: the engine's (``worker.data.tokenize_files``) against the ``tokenizers``
library's own batch API on the same corpus, in the same run.

For each corpus size the corpus is built (real public text: the files of ``--source`` folders,
by default the Python standard library's sources, repeated with a shift until the size is
reached; never written into the repository), then two fresh subprocesses tokenize it:

* ``engine``: ``worker.data.tokenize_files`` into an empty cache folder (hashing, reading,
  chunking, ``encode_batch``, uint16 writes, atomic publish: everything a run pays);
* ``library``: per file, read it whole, split it at blank lines, ``Tokenizer.encode_batch_fast``,
  ids to uint16, written to a file (the library's throughput with the least Python around it).

Peak memory is each subprocess' ``ru_maxrss`` after its imports (the high-water mark is reset
through ``/proc/self/clear_refs`` just before the work), minus its RSS at that moment: the
memory the preparation itself takes. Run it on an otherwise idle machine; figures go to
bench/RESULTS.md.

    uv run python bench/data_prep.py --sizes-mb 100,300 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, re, resource, sys, time
from pathlib import Path
mode, tok_dir, corpus, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
files = sorted(corpus.glob("*.txt"))
if mode == "engine":
    from worker.data import tokenize_files
    from worker.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir, 65536)
else:
    import numpy as np
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.encode_batch_fast(["warm up"])
def rss_kib():
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
try:
    Path("/proc/self/clear_refs").write_text("5")
except OSError:
    pass
base = rss_kib()
t0 = time.perf_counter()
if mode == "engine":
    n = len(tokenize_files(files, tok, tok_dir, 65536, cache_dir=out))
else:
    n = 0
    with open(out / "ids.bin", "wb") as fh:
        for path in files:
            with open(path, encoding="utf-8") as f:
                paragraphs = f.read().strip().split("\n\n")
            for enc in tok.encode_batch_fast(paragraphs):
                ids = np.asarray(enc.ids, dtype=np.uint16)
                fh.write(ids.tobytes())
                n += ids.size
seconds = time.perf_counter() - t0
print(json.dumps({"tokens": n, "seconds": seconds, "base_kib": base,
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def build_corpus(dest: Path, size_bytes: int, sources: list[Path], file_bytes: int) -> Path:
    """``dest/*.txt``: about ``size_bytes`` of UTF-8 text from the ``*.py``/``*.txt`` files of
    ``sources``, in files of about ``file_bytes``; each repetition is rotated so that no two
    files are identical."""
    blob = bytearray()
    for folder in sources:
        for path in sorted([*folder.glob("*.py"), *folder.glob("*.txt")]):
            raw = path.read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            blob += raw.replace(b"\r\n", b"\n") + b"\n\n"
    if not blob:
        raise SystemExit(f"no text found in {', '.join(map(str, sources))}")
    dest.mkdir(parents=True, exist_ok=True)
    written, i = 0, 0
    while written < size_bytes:
        shift = (i * 7919) % len(blob)
        rotated = bytes(blob[shift:] + blob[:shift])
        # start each file at a line start so the rotation never cuts a UTF-8 character
        rotated = rotated[rotated.index(b"\n") + 1 :] if b"\n" in rotated else rotated
        for j in range(0, len(rotated), file_bytes):
            piece = rotated[j : j + file_bytes]
            cut = piece.rfind(b"\n") + 1 if j + file_bytes < len(rotated) else len(piece)
            piece = piece[: cut or len(piece)][: max(size_bytes - written, 1)]
            (dest / f"{i:04d}-{j // file_bytes:03d}.txt").write_bytes(piece)
            written += len(piece)
            if written >= size_bytes:
                break
        i += 1
    return dest


def _run(mode: str, tok_dir: Path, corpus: Path, work: Path) -> dict:
    out = work / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(tok_dir), str(corpus), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    row["tokens_per_s"] = row["tokens"] / row["seconds"]
    row["prep_mb"] = (row["peak_kib"] - row["base_kib"]) / 1024
    row["peak_mb"] = row["peak_kib"] / 1024
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes-mb", default="100", help="corpus sizes in MB, comma-separated (default 100)"
    )
    parser.add_argument(
        "--source",
        action="append",
        type=Path,
        help="folder of *.py/*.txt public text (repeatable; default: the stdlib sources)",
    )
    parser.add_argument(
        "--file-mb", type=float, default=4.0, help="size of one corpus file (default 4)"
    )
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument(
        "--tokenizer-mb",
        type=float,
        default=5.0,
        help="text the tokenizer is trained on, in MB (default 5)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each side, alternating; the fastest of each is reported (default 1)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="where corpora are built (default: a temporary folder)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    sources = args.source or [Path(sysconfig.get_paths()["stdlib"])]
    sizes = [float(s) for s in args.sizes_mb.split(",") if s]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="moejobs-dataprep-"))
    sys.path.insert(0, str(REPO))
    from worker.tokenizer import train_tokenizer

    rows = []
    try:
        tok_corpus = build_corpus(
            work / "tok-corpus", int(args.tokenizer_mb * 1e6), sources, 1_000_000
        )
        tok_dir = train_tokenizer([tok_corpus], work / "tokenizer", vocab_size=args.vocab_size)
        for size in sizes:
            corpus = build_corpus(
                work / f"corpus-{size:g}mb", int(size * 1e6), sources, int(args.file_mb * 1e6)
            )
            n_bytes = sum(p.stat().st_size for p in corpus.glob("*.txt"))
            runs: dict[str, list[dict]] = {"library": [], "engine": []}
            for _ in range(args.repeat):  # alternating, so both sides see the same load
                for mode in runs:
                    runs[mode].append(_run(mode, tok_dir, corpus, work))
            library, engine = (
                max(runs[m], key=lambda r: r["tokens_per_s"]) for m in ("library", "engine")
            )
            rows.append(
                {
                    "corpus_mb": round(n_bytes / 1e6, 1),
                    "files": len(list(corpus.glob("*.txt"))),
                    "tokens": engine["tokens"],
                    "library_tokens": library["tokens"],
                    "engine_tokens_per_s": round(engine["tokens_per_s"]),
                    "library_tokens_per_s": round(library["tokens_per_s"]),
                    "ratio": round(engine["tokens_per_s"] / library["tokens_per_s"], 3),
                    "engine_runs_tokens_per_s": [round(r["tokens_per_s"]) for r in runs["engine"]],
                    "library_runs_tokens_per_s": [
                        round(r["tokens_per_s"]) for r in runs["library"]
                    ],
                    "engine_prep_mb": round(engine["prep_mb"], 1),
                    "library_prep_mb": round(library["prep_mb"], 1),
                    "engine_peak_mb": round(engine["peak_mb"], 1),
                    "library_peak_mb": round(library["peak_mb"], 1),
                }
            )
            print(
                json.dumps(rows[-1]), file=sys.stderr, flush=True
            )  # each size as soon as it is measured
            shutil.rmtree(corpus, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    doc = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_1m": round(os.getloadavg()[0], 2),
        "vocab_size": args.vocab_size,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{doc['machine']}, load {doc['load_1m']}, tokenizer of {args.vocab_size} ids")
    print(
        f"{'corpus':>9} {'files':>5} {'tokens':>12} {'engine tok/s':>13} {'library tok/s':>14} {'ratio':>6} "
        f"{'engine MB':>10} {'library MB':>11}"
    )
    for r in rows:
        print(
            f"{r['corpus_mb']:>7.1f}MB {r['files']:>5} {r['tokens']:>12,} {r['engine_tokens_per_s']:>13,} "
            f"{r['library_tokens_per_s']:>14,} {r['ratio']:>5.2f}x {r['engine_prep_mb']:>10.1f} "
            f"{r['library_prep_mb']:>11.1f}"
        )
    print(
        "MB: peak RSS of the preparation itself (ru_maxrss after the imports, minus the RSS then); "
        f"tokens/s: the fastest of {args.repeat} alternating run(s) per side"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
