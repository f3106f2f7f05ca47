"""train/distributed.py and the trainers under torchrun: 2 processes, gloo, CPU, tiny models.

The numbers: after k optimizer steps the trainable weights of a 2-process run equal a 1-process run over the
same global batches (≤ 1e-5, fp32) for DDP and FSDP; a dead or hung rank ends the other one with exit code 1
and a clear message within the collective timeout.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_toy  # noqa: E402
from train.distributed import (DistInfo, collective_timeout_s, describe_failure, shard, shard_for_eval,  # noqa: E402
                               shard_from, trainable_state_dict)

ROOT = Path(__file__).resolve().parent.parent
TOY = Path(__file__).resolve().parent / "dist_toy.py"


def dist_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", **extra)
    return env


def torchrun(args: list[str], nproc: int = 2, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS` (a free port is picked by the c10d rendezvous)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(**env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ pure helpers
def test_shard_is_disjoint_equal_and_resumable_at_a_global_position():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert sorted(sum(parts, [])) == list(range(9))          # disjoint; the 2 that do not divide are dropped
    # after k items on every rank, exactly items[:k*W] are consumed, so another world size resumes there
    k, w = 2, 3
    done = sorted(x for p in parts for x in p[:k])
    assert done == items[:k * w]
    assert [shard_from(items, k * w, r, 2) for r in range(2)] == [[6, 8], [7, 9]]
    assert shard(items, 0, 1) == items
    ev = [shard_for_eval(items, r, 4) for r in range(4)]
    assert {len(e) for e in ev} == {3}
    assert sorted(x for e in ev for x, counted in e if counted) == items   # each item counted exactly once


def test_timeout_setting_and_failure_messages(monkeypatch):
    monkeypatch.setenv("OHLORA_DIST_TIMEOUT", "12.5")
    assert collective_timeout_s() == 12.5
    assert collective_timeout_s(3) == 3.0
    monkeypatch.setenv("OHLORA_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="OHLORA_DIST_TIMEOUT"):
        collective_timeout_s()
    monkeypatch.delenv("OHLORA_DIST_TIMEOUT")
    assert collective_timeout_s() == 600.0
    msg = describe_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]"))
    assert msg is not None and "another rank died" in msg and "OHLORA_DIST_TIMEOUT" in msg
    assert describe_failure(ValueError("bad csv")) is None


def test_single_process_is_a_no_op():
    from train.distributed import init_distributed, wrap_ddp, apply_fsdp, loss_scale
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    m = dist_toy.make_model()
    assert wrap_ddp(m, info) is m and apply_fsdp(m, info, list(m.layers)) is m
    assert loss_scale(8, info) == (1 / 8, 8.0)


# ---------------------------------------------------------------------------------- toy DDP / FSDP runs
def test_toy_ddp_and_fsdp_equal_one_process(tmp_path):
    """2 ranks × accumulation 1 == 1 process × accumulation 2 over the same batches (DDP and FSDP2, mixed
    frozen/trainable parameters), sharded optimizer state round-trips, frozen weights are sharded 1/2."""
    for mode in ("ddp", "fsdp"):
        torchrun([str(TOY), mode, str(tmp_path)])
    model, _ = dist_toy.train(DistInfo(), "single", accum=2)
    ref = trainable_state_dict(model)
    start = {n: p for n, p in dist_toy.make_model().named_parameters() if p.requires_grad}
    assert max(float((ref[n] - start[n].detach()).abs().max()) for n in ref) > 1e-2   # training moved the weights
    for mode in ("ddp", "fsdp"):
        got = load_file(str(tmp_path / f"{mode}.safetensors"))
        assert sorted(got) == sorted(ref)
        assert max(float((got[n] - ref[n]).abs().max()) for n in ref) <= 1e-5, mode
        check = eval((tmp_path / f"{mode}_check.txt").read_text())
        assert check["optim_roundtrip"] == 0.0
        numel = check["numel_per_rank"]
        base = "layers.0.base.weight"
        full = dist_toy.DIM * dist_toy.DIM
        assert [n[base] for n in numel] == ([full, full] if mode == "ddp" else [full // 2, full // 2])
        shapes = eval((tmp_path / f"{mode}_shapes.txt").read_text())
        assert shapes["layers.0.lora_A"] == [4, dist_toy.DIM]   # full shapes inside full_trainable_params


# --------------------------------------------------------------------------------- dead and hung ranks
def _start_pair(mode: str, tmp_path: Path, timeout_s: int) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = dist_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OHLORA_DIST_TIMEOUT=str(timeout_s))
        procs.append(subprocess.Popen([sys.executable, str(TOY), mode, str(tmp_path)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 60
    line = ""
    while "ready" not in line and time.time() < deadline:   # rank 1 joined the group and is idling
        line = procs[1].stdout.readline()
    assert "ready" in line, procs[1].stderr.read()[-2000:]
    return procs


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_dead_or_hung_rank_ends_the_other_with_a_clear_message(tmp_path, how):
    timeout_s = 8
    rank0, rank1 = _start_pair("die", tmp_path, timeout_s)
    try:
        time.sleep(0.5)
        t0 = time.time()
        os.kill(rank1.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        try:
            _, err = rank0.communicate(timeout=timeout_s + 30)
        except subprocess.TimeoutExpired:
            rank0.kill()
            raise AssertionError(f"rank 0 still running {timeout_s + 30} s after rank 1 was {how}")
        waited = time.time() - t0
    finally:
        for p in (rank0, rank1):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    assert rank0.returncode == 1, err[-2000:]
    assert "another rank died or stopped responding" in err and "rank 0" in err, err[-2000:]
    assert "Traceback" not in err
    if how == "hung":   # nothing tells rank 0 but the clock: it must give up at the timeout, not hang
        assert timeout_s - 1 <= waited <= timeout_s + 20, waited
    else:               # a closed socket is noticed right away
        assert waited <= timeout_s + 5, waited
