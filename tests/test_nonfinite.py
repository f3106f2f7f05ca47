"""Never a silent NaN: a non-finite loss, gradient norm, parameter (after the step) or eval loss stops training
with NonFiniteError naming the optimizer step, before anything is saved — in train.loop.Trainer, for train.sft's
loss on a tiny GPT-NeoX + LoRA, and in sbert.train. (The CLIs also refuse `--lr inf` at parse time; these tests
go around the parser to prove the loop itself never trusts the numbers.)"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from train.loop import LoopConfig, NonFiniteError, NonFiniteLossError, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
NAN, INF = float("nan"), float("inf")


class Toy(torch.nn.Module):
    """loss = Σ (w·x − 1)² over 4 items, or sqrt(w)·x (finite at w = 0, its gradient is not)."""

    def __init__(self, w: float = 0.5, sqrt: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((4,), w))
        self.sqrt = sqrt

    def forward(self, x):
        if self.sqrt:
            return (self.w.sqrt() * x).sum(), 4
        return ((self.w * x - 1) ** 2).sum(), 4


def fit(module, out: Path | None, eval_losses=(), **cfg):
    """Trainer over 2 batches per epoch; eval_fn gives `eval_losses` in turn. Returns (error, saved names)."""
    saved: list[str] = []
    evals = iter(eval_losses)
    config = LoopConfig(**{"epochs": 2, "progress": False, "eval_at_start": False, "save_state_steps": 1,
                           "output_dir": str(out) if out else None, **cfg})
    trainer = Trainer(module, config, lambda e: [{"x": torch.ones(4)}] * 2,
                      eval_fn=(lambda: {"eval_loss": next(evals)}) if eval_losses else None,
                      save_fn=lambda folder: saved.append(folder.name.split(".")[1]))  # .best.XXXX.tmp
    with pytest.raises(NonFiniteError) as err:
        trainer.fit()
    message = str(err.value)
    assert "\n" not in message and err.value.exit_code == 1 and isinstance(err.value, RuntimeError)
    return message, saved


def nothing_saved(out: Path) -> bool:
    return not any((out / name).exists() for name in ("state", "best", "last"))


def test_old_name_still_works():
    assert NonFiniteLossError is NonFiniteError


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_non_finite_gradient_norm_stops_before_the_step(tmp_path, max_grad_norm):
    module = Toy(w=0.0, sqrt=True)          # loss 0, d sqrt(w)/dw = inf
    message, _ = fit(module, tmp_path, max_grad_norm=max_grad_norm)
    assert message.startswith("gradient norm is inf at optimizer step 1 ")
    assert torch.equal(module.w.detach(), torch.zeros(4))     # the step was not taken
    assert nothing_saved(tmp_path)


@pytest.mark.parametrize("cfg", [dict(lr=INF), dict(max_grad_norm=NAN), dict(lr=1e39)],
                         ids=["lr-inf", "max-grad-norm-nan", "lr-1e39"])
def test_non_finite_parameters_after_the_step(tmp_path, cfg):
    message, _ = fit(Toy(), tmp_path, **cfg)
    assert message.startswith("parameters became NaN/inf at optimizer step 1 (w)"), message
    assert nothing_saved(tmp_path)


def test_later_step_is_named_and_earlier_state_kept(tmp_path):
    """lr 1e30: step 1 is finite (w ≈ ±1e30), step 2's loss overflows — the state of step 1 stays."""
    message, _ = fit(Toy(), tmp_path, lr=1e30, max_grad_norm=None)
    assert "at optimizer step 2" in message and message.startswith(("training loss is inf", "gradient norm is"))
    import json
    assert json.loads((tmp_path / "state" / "meta.json").read_text())["global_step"] == 1
    assert not (tmp_path / "best").exists() and not (tmp_path / "last").exists()


@pytest.mark.parametrize("losses,step,saved", [((NAN,), "after optimizer step 2", []),
                                               ((0.5, NAN), "after optimizer step 4", ["best", "last"])])
def test_nan_eval_loss_stops_and_never_becomes_best(tmp_path, losses, step, saved):
    message, got = fit(Toy(), tmp_path, eval_losses=losses, lr=1e-3)
    assert message.startswith(f"eval loss is nan {step}")
    assert got == saved                    # the NaN evaluation wrote neither best/ nor last/
    import json
    state_step = json.loads((tmp_path / "state" / "meta.json").read_text())["global_step"]
    assert state_step == (2 if len(losses) == 1 else 4)   # the step's state, saved before the eval


def test_nan_eval_loss_at_start(tmp_path):
    message, saved = fit(Toy(), tmp_path, eval_losses=(INF,), eval_at_start=True)
    assert message.startswith("eval loss is inf at optimizer step 0 (before training") and saved == []
    assert nothing_saved(tmp_path)


# ------------------------------------------------------------------------------------- train.sft's loss
def tiny_lora_lm():
    from gptneox.config import GPTNeoXConfig
    from gptneox.model import GPTNeoXForCausalLM
    from lora import LoRAConfig, inject_lora
    from train.sft import CausalLMLoss
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64))
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["query_key_value", "dense"]))
    return model, CausalLMLoss(model)


def sft_batches(epoch):
    g = torch.Generator().manual_seed(epoch)
    ids = torch.randint(3, 64, (2, 12), generator=g)
    return [{"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}] * 3


@pytest.mark.parametrize("case", ["lr-inf", "max-grad-norm-nan", "nan-in-dense-lora-B", "nan-in-qkv-lora-B"])
def test_sft_loss_non_finite_stops_naming_the_step(tmp_path, case):
    model, loss_module = tiny_lora_lm()
    cfg = dict(max_steps=3, progress=False, eval_at_start=False, output_dir=str(tmp_path), save_state_steps=1)
    if case == "lr-inf":
        cfg["lr"] = INF
    if case == "max-grad-norm-nan":
        cfg["max_grad_norm"] = NAN
    if case.startswith("nan-in"):
        target = "attention.dense.lora_B" if "dense" in case else "query_key_value.lora_B"
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if target in n).view(-1)[0] = NAN
    saved = []
    trainer = Trainer(loss_module, LoopConfig(**cfg), sft_batches, save_fn=lambda f: saved.append(f))
    with pytest.raises(NonFiniteError) as err:
        trainer.fit()
    message = str(err.value)
    if case == "nan-in-dense-lora-B":   # on the residual stream: the loss itself is NaN
        assert message.startswith("training loss is nan at optimizer step 1 (epoch 1, micro-batch 1)"), message
    elif case == "nan-in-qkv-lora-B":   # CPU SDPA may drop a NaN query row from the forward (kernel per CPU): then
        # only the gradient has it; on an AVX2-only CPU the loss is already NaN. Either check stops step 1.
        assert message.startswith(("gradient norm is nan at optimizer step 1 ",
                                   "training loss is nan at optimizer step 1 (epoch 1, micro-batch 1)")), message
    else:
        assert message.startswith("parameters became NaN/inf at optimizer step 1 (model.gpt_neox.layers.0."), message
    assert nothing_saved(tmp_path) and saved == []


# ------------------------------------------------------------------------------------------------ sbert.train
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from sbert_fixtures import save_tiny_hf_encoder
    return save_tiny_hf_encoder(tmp_path_factory.mktemp("nf_bert") / "bert", model_type="bert",
                                model_max_length=64)


@pytest.mark.parametrize("lr,valid_ratio", [(INF, 0.2), (1e30, 0.0)], ids=["lr-inf", "lr-1e30-no-valid"])
def test_sbert_diverging_run_stops_before_saving(tiny_bert, tmp_path, lr, valid_ratio):
    """The issue's `sbert.train --lr 1e30 --valid-ratio 0` saved an all-NaN encoder as best; now it stops."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sbert.train import TrainConfig, train
    cfg = TrainConfig(base=str(tiny_bert), output=str(tmp_path), loss="cosine-mse", limit=40, valid_ratio=valid_ratio,
                      epochs=2, batch_size=8, lr=lr, test="", progress=False)
    with pytest.raises(NonFiniteError, match=r"at optimizer step \d+") as err:
        train(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "best").exists() and not (tmp_path / "last").exists()
    if not math.isinf(lr):   # some finite steps first: their states are kept, never a non-finite one
        from safetensors.torch import load_file
        if (tmp_path / "state").exists():
            assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "state" /
                                                                      "trainable.safetensors")).values())
