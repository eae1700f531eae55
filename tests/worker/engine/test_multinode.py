"""Multi-node training, shown on one machine: two ``torchrun`` "nodes" on 127.0.0.1 (one CPU
rank each, gloo) train the tiny MoE to the same losses as one process with the same global batch.

This is how ``num_nodes > 1`` trains (README "Multi-node training"): the launcher starts
``python -m worker.train`` on every node with the rank environment set (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``TORCHELASTIC_RUN_ID``);
the engine sees ``LOCAL_RANK`` and starts no ranks of its own (``worker.launch``), and
Lightning Fabric detects torchrun's environment and joins the group.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from service.config.validate import validate_configs
from tests.support import REPO
from tests.support.tiny import TINY_MODEL, tiny_train_config
from worker.launch import externally_launched
from worker.metrics import read_metrics
from worker.train import run_training

STEPS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> list[str]:
    """The ``torchrun`` of this interpreter's environment (``python -m torch.distributed.run``
    is the same program)."""
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def _node_cmd(node_rank: int, port: int, train_yaml: Path, model_yaml: Path) -> list[str]:
    return [
        *_torchrun(),
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--node-rank",
        str(node_rank),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        "worker.train",
        "--train-config",
        str(train_yaml),
        "--model-config",
        str(model_yaml),
    ]


def _losses(out: Path) -> list[float]:
    return [float(r["loss"]) for r in read_metrics(out / "metrics.csv")]


@pytest.mark.slow
def test_two_torchrun_nodes_equal_one_process(tmp_path, corpus, tokenizer_dir):
    """2 nodes x 1 rank x 1 micro-batch of 2 samples per step and 1 process x 2 accumulated
    micro-batches of 2 see the same 4 samples in every step (global batch 4; rank r takes
    micro-batch r of the step), so the step losses agree.

    Tolerance ``rel=1e-4`` (the two-rank test in ``test_process.py`` uses the same): the step
    loss and the gradients are means of the same float32 numbers summed in a different order
    (gloo's all-reduce across the nodes vs. accumulation in one process), a difference of about
    1e-7 relative per step that Adam's normalisation can enlarge in the few weights whose
    gradients are near zero; a wrong batch split or a missed all-reduce differs by percents."""
    one_out, two_out = tmp_path / "one", tmp_path / "two"
    base = tiny_train_config(one_out, corpus, tokenizer_dir, max_tokens=4 * 32 * STEPS)
    two = copy.deepcopy(base)
    two["out_dir"], two["num_nodes"], two["devices"] = str(two_out), 2, 1
    train_yaml, model_yaml = tmp_path / "two.yaml", tmp_path / "model.yaml"
    train_yaml.write_text(yaml.safe_dump(two), encoding="utf-8")
    model_yaml.write_text(yaml.safe_dump(TINY_MODEL), encoding="utf-8")

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"  # two processes on a shared CPU: no oversubscription
    started = time.monotonic()
    nodes = [
        subprocess.Popen(
            _node_cmd(rank, port, train_yaml, model_yaml),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=300))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for rank, (node, (_, err)) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank}: exit {node.returncode}\n{err[-3000:]}"
    two_nodes_s = time.monotonic() - started

    v1 = validate_configs(base, TINY_MODEL)
    r1 = run_training(v1.train, v1.model)
    assert r1.steps == STEPS and r1.tokens == 4 * 32 * STEPS

    log = (two_out / "train.log").read_text(encoding="utf-8")
    assert "2 rank(s)" in log, log[-2000:]
    assert (two_out / "final" / "lit_model.pth").is_file()  # written once, by global rank 0
    rows = read_metrics(two_out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert int(rows[-1]["tokens"]) == r1.tokens  # both nodes' samples counted
    one, two_losses = _losses(one_out), _losses(two_out)
    assert two_losses == pytest.approx(one, rel=1e-4), (one, two_losses)
    print(f"two torchrun nodes: {two_nodes_s:.1f} s; losses {two_losses} vs {one}")


@pytest.mark.parametrize(
    ("env", "external"),
    [
        ({}, False),
        ({"LOCAL_RANK": "0"}, True),  # torchrun, or the engine's own rank processes
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "16"}, True),  # one task of a multi-task srun
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, False),  # a worker started inside SLURM
    ],
)
def test_externally_launched_knows_torchrun_and_srun(monkeypatch, env, external):
    """A rank started by torchrun or by a multi-task ``srun`` starts no ranks of its own (each
    of SLURM's tasks would otherwise start ``devices - 1`` more processes)."""
    for key in ("LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert externally_launched() is external
