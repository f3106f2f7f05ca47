"""train/distributed.py and the trainers under torchrun: 2 processes, gloo, CPU, tiny models.

The numbers: after k optimizer steps the trainable weights of a 2-process run equal a 1-process run over the
same global batches (≤ 1e-5, fp32) for DDP and FSDP, on a tiny GPT-NeoX and a tiny Gemma-3 (train.sft); a dead or hung rank ends the other one with exit code 1
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
                               trainable_state_dict)

ROOT = Path(__file__).resolve().parent.parent
TOY = Path(__file__).resolve().parent / "dist_toy.py"


def dist_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", **extra})
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
    assert [shard(items[k * w:], r, 2) for r in range(2)] == [[6, 8], [7, 9]]   # what train.loop does
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
    from train.distributed import init_distributed, wrap_ddp, apply_fsdp, mean_grad_factor
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    m = dist_toy.make_model()
    assert wrap_ddp(m, info) is m and apply_fsdp(m, info, list(m.layers)) is m
    assert mean_grad_factor(8, info.world_size) == 1 / 8 and mean_grad_factor(8, 2) == 1 / 4


# ---------------------------------------------------------------------------------- toy DDP / FSDP runs
def test_toy_ddp_and_fsdp_equal_one_process(tmp_path):
    """2 ranks × accumulation 1 == 1 process × accumulation 2 over the same batches (DDP and FSDP2, mixed
    frozen/trainable parameters), sharded optimizer state round-trips, frozen weights are sharded 1/2, rank-0
    failures reach the other ranks, a long rank-0 job outlives the collective timeout with on_main(wait_s)."""
    torchrun([str(TOY), "ddp,fsdp", str(tmp_path)], OHLORA_DIST_TIMEOUT="5")
    model, _ = dist_toy.train(DistInfo(), "single", accum=2)
    ref = trainable_state_dict(model)
    start = {n: p for n, p in dist_toy.make_model().named_parameters() if p.requires_grad}
    assert max(float((ref[n] - start[n].detach()).abs().max()) for n in ref) > 1e-2   # training moved the weights
    for mode in ("ddp", "fsdp"):
        got = load_file(str(tmp_path / f"{mode}.safetensors"))
        assert sorted(got) == sorted(ref)
        assert max(float((got[n] - ref[n]).abs().max()) for n in ref) <= 1e-5, mode
        check = eval((tmp_path / f"{mode}_check.txt").read_text())
        assert check["optim_roundtrip"] == 0.0 and check["param_roundtrip"] == 0.0 and check["zeroed"] == 0.0
        assert check["slept"] == dist_toy.SLOW_S   # on_main(wait_s=...) outlived the 5 s collective timeout
        assert check["on_main_errors"][0] == "OSError: disk full"
        assert check["on_main_errors"][1].startswith("DistributedError: rank 1: rank 0 failed in failing_write")
        numel = check["numel_per_rank"]
        base = "layers.0.base.weight"
        full = dist_toy.DIM * dist_toy.DIM
        assert [n[base] for n in numel] == ([full, full] if mode == "ddp" else [full // 2, full // 2])
        shapes = eval((tmp_path / f"{mode}_shapes.txt").read_text())
        assert shapes["layers.0.lora_A"] == [4, dist_toy.DIM]   # full shapes inside full_trainable_params


# ------------------------------------------------------------------------------- train.sft under torchrun
SFT_ARGS = ["--max-steps", "3", "--batch-size", "4", "--lr", "5e-3", "--warmup-ratio", "0", "--lora-r", "4",
            "--lora-dropout", "0", "--eval-prompts", "0", "--no-progress", "--max-length", "96"]

# Installed with PYTHONPATH into every torchrun worker: any rank but 0 that opens a file for writing, makes a
# folder or renames something under OHLORA_TEST_NO_WRITES fails at once.
SITECUSTOMIZE = """
import os, sys
_root = os.environ.get("OHLORA_TEST_NO_WRITES")
if _root and os.environ.get("RANK", "0") != "0":
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def _hook(event, args):
        if event == "open" and args and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1], args[2]
            writes = (mode and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE)
        elif event in ("os.mkdir", "os.rename", "os.remove", "shutil.rmtree"):
            writes = True
        else:
            return
        if writes and not isinstance(args[0], int) and os.path.abspath(os.fsdecode(args[0])).startswith(_root):
            raise PermissionError(f"rank {os.environ['RANK']} wrote {args[0]} ({event})")
    sys.addaudithook(_hook)
"""


@pytest.fixture(scope="module", params=["gpt_neox", "gemma3"])
def sft_model(request, tmp_path_factory) -> Path:
    """A tiny NeoX folder, and a tiny Gemma-3 folder with the same tokenizer: the same runs on both families."""
    import pandas as pd
    from neox_fixtures import save_tiny_hf_neox, train_tiny_tokenizer

    folder = tmp_path_factory.mktemp("neox")
    df = pd.read_csv(ROOT / "data" / "ohlora_sft.csv")
    texts = [str(t) for t in list(df["input_data"]) + list(df["output_data"].dropna())]
    save_tiny_hf_neox(folder, vocab_size=320, max_position_embeddings=128)
    train_tiny_tokenizer(folder, texts, vocab_size=300)
    if request.param == "gemma3":
        from gemma_fixtures import save_tiny_sft_gemma
        return save_tiny_sft_gemma(tmp_path_factory.mktemp("gemma"), folder, vocab_size=320)
    return folder


@pytest.fixture(scope="module")
def sft_single(sft_model, tmp_path_factory) -> Path:
    """The reference: 1 process, batch 4 × accumulation 2 = the 2-rank runs' global batch of 8."""
    from train.sft import run

    out = tmp_path_factory.mktemp("sft-single")
    run(["--model", str(sft_model), "--output-dir", str(out), "--grad-accum", "2", *SFT_ARGS])
    return out


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != "loss.png")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sft_two_ranks_equal_one_process_and_only_rank0_writes(sft_model, sft_single, tmp_path, mode):
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "out"
    flags = ["--fsdp"] if mode == "fsdp" else []
    proc = torchrun(["-m", "train.sft", "--model", str(sft_model), "--output-dir", str(out), *SFT_ARGS, *flags],
                    PYTHONPATH=f"{hook_dir}{os.pathsep}{ROOT}", OHLORA_TEST_NO_WRITES=str(out))
    assert f"global batch 8 ({mode.upper()})" in proc.stdout
    ref, got = _adapter(sft_single / "last"), _adapter(out / "last")
    start_b = max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k)
    assert start_b > 1e-2                                  # B starts at 0: the 3 steps really trained it
    assert _max_diff(got, ref) <= 1e-5
    # the same files, and one log line per step/eval (not one per rank)
    assert _files(out) == _files(sft_single)
    from train.progress import read_jsonl
    assert len(read_jsonl(out / "log.jsonl")) == len(read_jsonl(sft_single / "log.jsonl"))
    eval_loss = [r["eval_loss"] for r in read_jsonl(out / "log.jsonl") if "eval_loss" in r]
    ref_loss = [r["eval_loss"] for r in read_jsonl(sft_single / "log.jsonl") if "eval_loss" in r]
    assert eval_loss and abs(eval_loss[-1] - ref_loss[-1]) <= 1e-5   # all-reduced over the 2 ranks' shares
    # the 2-process adapter loads in one process and gives the reference's logits
    from lora import load_adapter
    from infer.models import load_causal_lm
    ids = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = []
    for folder in (out / "last", sft_single / "last"):
        model = load_adapter(load_causal_lm(sft_model)[0], folder).eval()
        with torch.no_grad():
            logits.append(model(ids))
    assert float((logits[0] - logits[1]).abs().max()) <= 1e-5


def test_sft_resume_with_another_world_size(sft_model, sft_single, tmp_path):
    """2 ranks (DDP) stop after 2 of 3 steps; 1 process with accumulation 2 finishes: the reference's weights."""
    out = tmp_path / "out"
    torchrun(["-m", "train.sft", "--model", str(sft_model), "--output-dir", str(out), "--stop-after-steps", "2",
              *SFT_ARGS])
    import json
    meta = json.loads((out / "state" / "meta.json").read_text())
    assert (meta["global_step"], meta["micro_batch"], meta["world_size"]) == (2, 4, 2)   # global position
    from train.sft import run
    run(["--model", str(sft_model), "--output-dir", str(out), "--grad-accum", "2", "--resume",
         str(out / "state"), *SFT_ARGS])
    assert _max_diff(_adapter(out / "last"), _adapter(sft_single / "last")) <= 1e-5


# ----------------------------------------------------------------------------- sbert.train under torchrun
def test_sbert_ddp_equals_one_process(tmp_path):
    """2 ranks × batch 4 (DDP) == 1 process × batch 8 over the same pairs: unbucketed batches of 8 are the
    concatenation of consecutive batches of 4, which is what ranks 0 and 1 take at each step."""
    import json
    from sbert_fixtures import save_tiny_hf_encoder
    from sbert.train import parse_args, train

    base = save_tiny_hf_encoder(tmp_path / "bert", model_type="bert", model_max_length=64)
    config = json.loads((base / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # same masks impossible otherwise
    (base / "config.json").write_text(json.dumps(config))
    common = ["--model", str(base), "--loss", "cosine-mse", "--limit", "80", "--epochs", "1", "--no-bucket", "--test=",
              "--lr", "1e-3", "--no-progress"]  # cosine-mse: an in-batch loss differs under a split batch
    proc = torchrun(["-m", "sbert.train", *common, "--batch-size", "4", "--output-dir", str(tmp_path / "ddp")])
    assert "global batch 8 (DDP)" in proc.stdout
    train(parse_args([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "single")]))
    got = load_file(str(tmp_path / "ddp" / "last" / "model.safetensors"))
    ref = load_file(str(tmp_path / "single" / "last" / "model.safetensors"))
    start = load_file(str(base / "model.safetensors"))
    key = next(k for k in ref if k.endswith("attention.self.query.weight"))
    assert float((ref[key] - start[next(k for k in start if k.endswith(key))]).abs().max()) > 1e-3   # it trained
    assert _max_diff(got, ref) <= 1e-5


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
    timeout_s = 6
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
