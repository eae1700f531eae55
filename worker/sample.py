"""Generate text from a LitGPT checkpoint folder: one sample in-process (:func:`generate_sample`,
what ``litgpt generate <dir>`` does), and the samples of each recorded checkpoint
(``python -m worker.sample FOLDER... --prompts-json '[...]'``).

The runner starts this for the checkpoint folders it records (``final/`` included), one
sampler at a time per attempt (the folders recorded meanwhile wait and go to the next one), in a
process of its own at the lowest CPU priority (``nice 19``), on the CPU with at most
:data:`THREADS` threads: it never holds GPU memory the training needs and never delays a step.
It loads the folder as stock LitGPT does (``litgpt.GPT`` from ``model_config.yaml``,
``lit_model.pth`` with ``strict=True``, ``litgpt.Tokenizer``), continues each prompt greedily
(argmax, no sampling: the same weights give the same text, so the checkpoints of a run and the
runs of a sweep compare) for up to ``max_new_tokens`` tokens or the tokenizer's EOS, and writes
``out_dir/samples/<checkpoint>.json`` (``service.contract.samples_path``) through a temporary
file and a rename. A folder removed meanwhile (retention) is skipped quietly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service import contract
from worker.launch import REPO_ROOT

#: CPU threads a sampler may use (the training has the rest).
THREADS = 2


def generate_sample(
    checkpoint_dir: Path,
    prompt: str,
    max_new_tokens: int = 80,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 1234,
) -> str:
    """Sample a continuation of ``prompt`` from the model in ``checkpoint_dir`` on the CPU.

    ``checkpoint_dir`` is a folder the engine wrote (``lit_model.pth``, ``model_config.yaml`` and
    the tokenizer files). Returns the prompt followed by the generated text.

    Raises:
        FileNotFoundError: a required file is missing from the folder.
    """
    import litgpt
    import torch
    from litgpt.generate.base import generate

    folder = Path(checkpoint_dir)
    config = litgpt.Config.from_file(folder / "model_config.yaml")
    tokenizer = litgpt.Tokenizer(folder)
    torch.manual_seed(seed)
    model = litgpt.GPT(config)
    model.load_state_dict(
        torch.load(folder / "lit_model.pth", map_location="cpu", weights_only=True)
    )
    model.eval()
    encoded = tokenizer.encode(prompt)
    max_returned = min(encoded.numel() + max_new_tokens, config.block_size)
    model.max_seq_length = max_returned
    model.set_kv_cache(batch_size=1, device=torch.device("cpu"))
    with torch.inference_mode():
        out = generate(
            model,
            encoded,
            max_returned_tokens=max_returned,
            temperature=temperature,
            top_k=top_k,
            eos_id=tokenizer.eos_id,
        )
    return tokenizer.decode(out)


def generate_samples(folder: Path, prompts: list[str], max_new_tokens: int) -> dict[str, Any]:
    """Greedy continuations of ``prompts`` by the checkpoint in ``folder`` (module docstring);
    the ``samples.json`` document. Raises what loading the folder raises."""
    import litgpt
    import torch

    torch.set_num_threads(THREADS)
    config = litgpt.Config.from_file(folder / contract.CHECKPOINT_MODEL_CONFIG)
    model = litgpt.GPT(config)
    state = torch.load(folder / contract.CHECKPOINT_WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    tokenizer = litgpt.Tokenizer(folder)
    samples = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer.encode(prompt, bos=tokenizer.bos_id is not None).tolist()
            start = len(ids)
            for _ in range(max_new_tokens):
                window = torch.tensor([ids[-config.block_size :]], dtype=torch.long)
                next_id = int(model(window)[0, -1].argmax())
                if next_id == tokenizer.eos_id:
                    break
                ids.append(next_id)
            text = tokenizer.decode(torch.tensor(ids[start:], dtype=torch.long))
            samples.append({"prompt": prompt, "text": text})
    meta_path = folder / "training_state.json"
    step = json.loads(meta_path.read_text()).get("step") if meta_path.is_file() else None
    return {
        "checkpoint": folder.name,
        "step": step,
        "generated_at": datetime.now(UTC).isoformat(),
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "samples": samples,
    }


def write_samples(folder: Path, prompts: list[str], max_new_tokens: int) -> Path | None:
    """:func:`generate_samples` written to ``contract.samples_path(folder)`` atomically; None
    when the folder disappeared (retention) before or while sampling."""
    try:
        doc = generate_samples(folder, prompts, max_new_tokens)
    except FileNotFoundError:
        if not folder.exists():
            return None
        raise
    if not folder.exists():
        return None
    target = contract.samples_path(folder)
    target.parent.mkdir(exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def sample_command(folders: list[Path], prompts: list[str], max_new_tokens: int) -> list[str]:
    """The command line of a sampler for ``folders`` (in order)."""
    return [
        sys.executable,
        "-m",
        "worker.sample",
        *(str(f) for f in folders),
        "--prompts-json",
        json.dumps(prompts),
        "--max-new-tokens",
        str(max_new_tokens),
    ]


def start_sampler(
    folders: list[Path], prompts: list[str], max_new_tokens: int, log_path: Path
) -> subprocess.Popen[bytes] | None:
    """Start a sampler for ``folders`` in the background (lowest priority, its own session,
    output appended to ``log_path``); None when there is nothing to sample (no prompts, no
    tokens)."""
    if not prompts or max_new_tokens <= 0 or not folders:
        return None
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            sample_command(folders, prompts, max_new_tokens),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: os.nice(19),  # noqa: PLW1509 - only os.nice, no locks
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.sample", description=__doc__)
    parser.add_argument("folders", type=Path, nargs="+", help="checkpoint folders, in order")
    parser.add_argument("--prompts-json", required=True, help="a JSON list of prompt strings")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    prompts = [str(p) for p in json.loads(args.prompts_json)]
    status = 0
    for folder in args.folders:
        try:
            written = write_samples(folder, prompts, args.max_new_tokens)
        except Exception as exc:  # one unloadable folder must not cost the others their samples
            print(f"[moejobs] samples of {folder} failed: {exc!r}", flush=True)
            status = 1
            continue
        print(f"[moejobs] samples: {written or f'{folder} is gone'}", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
