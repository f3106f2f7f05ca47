"""Crash safety: SIGKILL `train.sft` and `sbert.train` at chosen points, resume, and get an uninterrupted run.

Each trainer runs in a subprocess through a small `python -c` wrapper (no test hooks in library code) that
SIGKILLs the process at one point: right after log.jsonl got the line of step k (so mid-run, before the state of
step k is written), or at the N-th `os.replace` of core.atomic whose target is `state`, `.state.old`, `best`,
`.last.old`… — before or after the rename, i.e. inside every window of a folder swap. A chain of such kills,
each run resuming the previous one's `OUT/state`, must leave a resumable state after every kill (the previous
one at worst), have its stale temporaries removed by the next run, keep one log line per step, and end with
adapter / encoder weights and train losses bitwise equal to one uninterrupted run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# argv: MODULE ARGS... (a CLI run like `python -m MODULE`) or `sbert-config JSON` (sbert.train.train(TrainConfig)).
# $KILL (JSON): {"log_step": k} or {"dst": NAME, "nth": N, "when": "before" | "after"}.
WRAPPER = r"""
import json, os, signal, sys
kill = json.loads(os.environ.get("KILL") or "null")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if kill and "dst" in kill:
    import core.atomic
    real_replace, seen = os.replace, [0]
    def replace(src, dst):
        if os.path.basename(os.fspath(dst)) != kill["dst"]:
            return real_replace(src, dst)
        seen[0] += 1
        if seen[0] == kill["nth"] and kill["when"] == "before":
            die()
        real_replace(src, dst)
        if seen[0] == kill["nth"]:
            die()
    class Os:  # core.atomic's `os`, with one function replaced
        def __getattr__(self, name):
            return getattr(os, name)
    core.atomic.os = Os()
    core.atomic.os.replace = replace
if kill and "log_step" in kill:
    import train.progress
    real_log = train.progress.JsonlLogger.log
    def log(self, **record):
        real_log(self, **record)
        if record.get("step") == kill["log_step"] and "train_loss" in record:
            die()
    train.progress.JsonlLogger.log = log
if sys.argv[1] == "sbert-config":
    from sbert.train import TrainConfig, train
    train(TrainConfig(**json.loads(sys.argv[2])))
else:
    import runpy
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def env(kill: dict | None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "KILL")}
    e.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             PYTHONWARNINGS="ignore", KILL=json.dumps(kill))
    return e


def start(args: list[str], kill: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRAPPER, *args], cwd=ROOT, env=env(kill), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, killed: bool) -> None:
    out, err = proc.communicate(timeout=120)
    if killed:   # the kill point must really be reached: a run that ends normally proves nothing
        assert proc.returncode == -9, f"not killed (rc {proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}"
    else:
        assert proc.returncode == 0, f"rc {proc.returncode}:\n{out[-2000:]}\n{err[-3000:]}"


def stale(out: Path) -> set[tuple[str, int, int]]:
    """Leftovers of interrupted writes (temporary siblings, swapped-out folders) as (name, inode, mtime): a
    `.state.old` made again by a later kill is another entry."""
    return {(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()
            if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))}


def saved_step(out: Path) -> int:
    """The step of the resumable state: OUT/state, or `.state.old` when a kill fell between the two renames
    (the next run's recover_dir moves it back). Both files are checked to be complete."""
    folder = out / "state" if (out / "state").is_dir() else out / ".state.old"
    load_file(str(folder / "trainable.safetensors"))
    assert (folder / "state.pt").stat().st_size > 0
    return json.loads((folder / "meta.json").read_text())["global_step"]


def train_lines(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train_loss" in r]


def log_shape(out: Path) -> list[tuple]:
    """(step, keys) of every log line but the resume events: the same for a chain of kills as for one run."""
    skip = {"time_s", "tokens_per_s", "event"}
    return [(r.get("step"), tuple(sorted(set(r) - skip)))
            for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r.get("event") != "resume"]


def run_chain(args_for, out: Path, kills: list, reference: subprocess.Popen, ref: Path, weights: str) -> None:
    """Run `kills` in a chain (each run resumes OUT/state), check each kill, finish, compare with `ref`."""
    previous_stale: set = set()
    last_step = 0
    for i, (kill, check) in enumerate(kills):
        finish(start(args_for(resume=i > 0), kill), killed=True)
        left = stale(out)
        assert not (left & previous_stale), f"stale temporaries of the previous kill survived: {left}"
        step = saved_step(out)
        assert step >= last_step, (kill, step, last_step)   # the previous state at worst
        check(out, step, left)
        previous_stale, last_step = left, step
    finish(start(args_for(resume=True)), killed=False)
    finish(reference, killed=False)
    assert not stale(out), stale(out)
    steps = [r["step"] for r in train_lines(out)]
    assert steps == sorted(set(steps)) == list(range(1, steps[-1] + 1))      # one line per step
    assert [r["train_loss"] for r in train_lines(out)] == [r["train_loss"] for r in train_lines(ref)]
    assert log_shape(out) == log_shape(ref)
    for name in ("last", "best"):
        got, want = load_file(str(out / name / weights)), load_file(str(ref / name / weights))
        assert got.keys() == want.keys()
        assert all(got[k].equal(want[k]) for k in want), name    # bitwise
    got, want = (load_file(str(d / "state" / "trainable.safetensors")) for d in (out, ref))
    assert all(got[k].equal(want[k]) for k in want)


def expect(**checks):
    """A check of the files right after a kill: the saved step, and which leftovers it must have made."""
    def check(out: Path, step: int, left: set[str]) -> None:
        if "step" in checks:
            assert step == checks["step"], (step, checks)
        for pattern in checks.get("left", ()):
            assert any(name.startswith(pattern) for name, *_ in left), (pattern, left)
        if "missing" in checks:
            assert not (out / checks["missing"]).exists()
    return check


# -------------------------------------------------------------------------------------------------- train.sft
@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny default base (2 layers, hidden 64) and 16 train + 4 valid rows: 4 steps per epoch at batch 4."""
    from train.default_model import DefaultModelSpec, build_default_base
    folder = tmp_path_factory.mktemp("crash_sft")
    spec = DefaultModelSpec(num_hidden_layers=2, hidden_size=64, vocab_size=400, pretrain_epochs=1)
    base = build_default_base(folder / "base", spec=spec, progress=False)
    df = pd.read_csv(ROOT / "data" / "ohlora_sft.csv")
    pd.concat([df[df.split == "train"].head(16), df[df.split == "valid"].head(4)]).to_csv(
        folder / "small.csv", index=False)
    return base, folder / "small.csv"


def test_sft_killed_anywhere_resumes_to_the_uninterrupted_weights(sft_inputs, tmp_path):
    base, data = sft_inputs
    out, ref = tmp_path / "out", tmp_path / "ref"

    def args(output: Path = out, resume: bool = False) -> list[str]:
        return ["train.sft", "--model", str(base), "--data", str(data), "--output-dir", str(output),
                "--max-steps", "6", "--batch-size", "4", "--lr", "5e-3", "--lora-r", "4", "--lora-dropout", "0.1",
                "--save-state-steps", "1", "--eval-prompts", "0", "--no-progress", "--threads", "1",
                *(["--resume", str(output / "state")] if resume else [])]

    reference = start(args(ref))     # in parallel with the chain (2 cores)
    kills = [
        ({"log_step": 2}, expect(step=1)),                                    # mid-run: step 2 logged, not saved
        ({"dst": ".state.old", "nth": 1, "when": "before"},                   # new state written, not swapped in
         expect(step=1, left=[".state."])),
        # (between the two renames, only .state.old left: test_sft_resume_flag_accepts_a_state_mid_swap)
        ({"dst": "state", "nth": 3, "when": "after"},                         # swapped in, old not yet deleted
         expect(step=4, left=[".state.old"])),
        ({"dst": "best", "nth": 1, "when": "before"},                         # epoch end: best/ being written
         expect(step=4, left=[".best."], missing="best")),
        ({"dst": ".best.old", "nth": 1, "when": "after"},                     # the last eval: best/ mid-swap
         expect(step=6, left=[".best.old"], missing="best")),
        ({"dst": ".last.old", "nth": 1, "when": "after"},                     # then last/ mid-swap
         expect(step=6, left=[".last.old"], missing="last")),
    ]
    run_chain(args, out, kills, reference, ref, "adapter_model.safetensors")


# ------------------------------------------------------------------------------------------------ sbert.train
def test_sbert_killed_anywhere_resumes_to_the_uninterrupted_weights(tmp_path):
    from sbert_fixtures import save_tiny_hf_encoder
    base = save_tiny_hf_encoder(tmp_path / "bert", model_type="bert", model_max_length=64)
    out, ref = tmp_path / "out", tmp_path / "ref"

    def args(output: Path = out, resume: bool = False) -> list[str]:
        # 30 pairs, 24 for training: 3 steps of 8 per epoch, 2 epochs; dropout on (the RNG must resume too)
        cfg = dict(base=str(base), output=str(output), loss="cosine-mse", limit=30, valid_ratio=0.2, epochs=2,
                   batch_size=8, lr=1e-3, test="", progress=False, log_every=1, num_threads=1, save_state_steps=1,
                   resume=str(output / "state") if resume else None)
        return ["sbert-config", json.dumps(cfg)]

    reference = start(args(ref))
    kills = [
        ({"log_step": 2}, expect(step=1)),
        ({"dst": ".state.old", "nth": 1, "when": "after"}, expect(step=1, left=[".state.old"], missing="state")),
        ({"dst": "best", "nth": 1, "when": "after"}, expect(step=3)),         # best/ in, last/ not yet written
        ({"dst": ".last.old", "nth": 1, "when": "before"}, expect(step=6, left=[".last."])),
    ]
    run_chain(args, out, kills, reference, ref, "model.safetensors")


def test_corrupt_state_is_a_resume_error_naming_the_file(sft_inputs, tmp_path):
    """A truncated trainable.safetensors / state.pt, or garbage: ResumeError naming the file (CLI: one line)."""
    import torch

    from train.loop import LoopConfig, ResumeError, Trainer

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return (self.w * x).sum(), 3

    def trainer(**kw) -> Trainer:
        cfg = LoopConfig(max_steps=2, progress=False, output_dir=str(tmp_path / "o"), **kw)
        return Trainer(Toy(), cfg, lambda e: [{"x": torch.ones(3)}] * 2)

    trainer().fit()
    state = tmp_path / "o" / "state"
    for name, damage in [("trainable.safetensors", lambda b: b[: len(b) - 5]), ("trainable.safetensors",
                         lambda b: b"\x00" * len(b)), ("state.pt", lambda b: b[: len(b) // 2]),
                         ("state.pt", lambda b: b"garbage")]:
        broken = tmp_path / f"broken-{name}-{len(list(tmp_path.iterdir()))}"
        broken.mkdir()
        for f in state.iterdir():
            (broken / f.name).write_bytes(damage(f.read_bytes()) if f.name == name else f.read_bytes())
        with pytest.raises(ResumeError, match=str(broken / name)) as err:
            trainer(resume=str(broken)).fit()
        assert "\n" not in str(err.value)


def test_sft_resume_flag_accepts_a_state_mid_swap(sft_inputs, tmp_path, capsys):
    """A kill between the two renames of a state swap leaves only `.state.old`: `--resume OUT/state` continues."""
    from train.sft import main
    base, data = sft_inputs
    common = ["--model", str(base), "--data", str(data), "--output-dir", str(tmp_path), "--max-steps", "2",
              "--batch-size", "4", "--lora-r", "4", "--eval-prompts", "0", "--no-progress", "--threads", "1"]
    assert main(common + ["--stop-after-steps", "1"]) == 0
    os.replace(tmp_path / "state", tmp_path / ".state.old")    # what the kill leaves
    assert main(common + ["--resume", str(tmp_path / "state")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "state" / "meta.json").read_text())["global_step"] == 2


def test_atomic_writes_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    import torch

    from core.atomic import atomic_write_dir, atomic_write_text
    from core.safetensors_io import save_folder

    old = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "a.json", "{}")
        d = atomic_write_dir(tmp_path / "adapter", lambda tmp: (tmp / "x.txt").write_text("x"))
        m = save_folder({"w": torch.zeros(2)}, tmp_path / "model", {"config.json": "{}"})
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644          # mkstemp alone gives 0o600
    assert d.stat().st_mode & 0o777 == 0o755          # mkdtemp alone gives 0o700
    assert m.stat().st_mode & 0o777 == 0o755
    assert (m / "model.safetensors").stat().st_mode & 0o777 == 0o644
