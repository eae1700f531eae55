"""The ``moejobs`` command.

Subcommands that train import torch lazily, so the command works on an API-only install for
everything else.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _cmd_schema(args: argparse.Namespace) -> int:
    from service.schemas import model_config_json_schema, train_config_json_schema

    schema = train_config_json_schema() if args.which == "train" else model_config_json_schema()
    print(json.dumps(schema, indent=2))
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from worker.errors import DataError
    from worker.tokenizer import train_tokenizer

    try:
        out = train_tokenizer([Path(d) for d in args.data], Path(args.out), vocab_size=args.vocab_size)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tokenizer written to {out}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from worker.cli import main as train_main

    argv = ["--config", args.train_config, "--model-config", args.model_config, "--dry-run"]
    if args.preset:
        argv += ["--preset", args.preset]
    if args.smoke_test:
        argv.append("--smoke-test")
    return train_main(argv, prog="moejobs validate")


def _run_step(title: str, argv: list[str]) -> int:
    print(f"\n== {title}\n$ run_train.py {' '.join(argv)}", flush=True)
    # A subprocess per phase: all memory of the 549M-parameter smoke test is returned before
    # the next phase, and Fabric can re-execute the command line for extra ranks.
    return subprocess.call([sys.executable, "-m", "worker.cli", *argv])


def _cmd_demo(args: argparse.Namespace) -> int:
    from worker.corpus import build_corpus
    from worker.tokenizer import train_tokenizer

    data = Path(args.data_dir)
    corpus = data / "custom_text"
    train_dir, val_dir = build_corpus(corpus)
    n_train, n_val = len(list(train_dir.glob("*.txt"))), len(list(val_dir.glob("*.txt")))
    print(f"== corpus: {n_train} training and {n_val} validation files in {corpus} "
          "(the Python standard library's own sources)")
    tok = data / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        train_tokenizer([train_dir], tok, vocab_size=4096)
        print(f"== tokenizer: byte-level BPE, 4096 ids, trained into {tok}")
    else:
        print(f"== tokenizer: using {tok}")

    paths = ["--train-data-path", str(train_dir), "--val-data-path", str(val_dir), "--tokenizer-dir", str(tok)]
    if not args.skip_smoke_test:
        rc = _run_step("smoke test: the shipped MoE-200M configs with the spec's --smoke-test overrides",
                       ["--smoke-test", *paths, "--out-dir", str(Path(args.out_dir) / "smoke-test")])
        if rc != 0:
            print(f"smoke test failed (exit {rc})", file=sys.stderr)
            return rc
    out = Path(args.out_dir) / "cpu-tiny"
    rc = _run_step("training the cpu-tiny preset (a 4-layer, 4-expert MoE) on the corpus",
                   ["--preset", "cpu-tiny", *paths, "--out-dir", str(out)])
    if rc != 0:
        print(f"training failed (exit {rc})", file=sys.stderr)
        return rc
    from worker.sample import generate_sample

    final = out / "final"
    print(f"\n== a sample from {final}:\n")
    print(generate_sample(final, args.prompt, max_new_tokens=120))
    print(f"\n== the trained model is in {final} (a LitGPT checkpoint folder: "
          f"`uv run litgpt generate {final} --prompt 'def '` works on it)")
    return 0


def _cmd_train(argv: list[str]) -> int:
    from worker.cli import main as train_main

    return train_main(argv, prog="moejobs train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moejobs", description="Training jobs for LitGPT Mixture-of-Experts models.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="build a corpus and tokenizer, smoke-test, train cpu-tiny, print a sample")
    d.add_argument("--data-dir", default="data", help="corpus and tokenizer go here")
    d.add_argument("--out-dir", default="out", help="run outputs go here")
    d.add_argument("--prompt", default="def ")
    d.add_argument("--skip-smoke-test", action="store_true", help="skip the MoE-200M smoke test (needs ~12 GB RAM on CPU)")
    d.set_defaults(func=_cmd_demo)

    sub.add_parser("train", help="train locally: same flags as run_train.py (moejobs train --help)", add_help=False)

    v = sub.add_parser("validate", help="validate configs, print warnings and the estimate")
    v.add_argument("train_config", nargs="?", default="configs/train_config.yaml")
    v.add_argument("model_config", nargs="?", default="configs/model_config.yaml")
    v.add_argument("--preset")
    v.add_argument("--smoke-test", action="store_true")
    v.set_defaults(func=_cmd_validate)

    s = sub.add_parser("schema", help="print the JSON Schema of a config")
    s.add_argument("which", choices=["train", "model"])
    s.set_defaults(func=_cmd_schema)

    t = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="train a byte-level BPE tokenizer folder that LitGPT loads")
    tt.add_argument("--data", action="append", required=True, help="folder of .txt files (repeatable)")
    tt.add_argument("--out", required=True, help="tokenizer folder to write")
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.set_defaults(func=_cmd_tokenizer_train)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # everything after `train` belongs to run_train.py's parser
        return _cmd_train(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
