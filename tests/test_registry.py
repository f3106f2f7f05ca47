"""The model-family registry (core/registry.py): a toy third family, registered inside the test, goes through
load -> LoRA -> one SFT step -> greedy sampling -> HF export with no edit to any other package; lookups by
config.json model_type and GGUF architecture; clashes refused."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pytest
import torch
from torch import nn

from core.causal_lm import DecoderLM
from core.registry import Family, families, family_for_model_type, register, unregister
from core.safetensors_io import SafetensorsFile, assign_state, match_keys, read_state, save_folder, weight_files


# ---------------------------------------------------------------------------------- the toy family, in full
@dataclass
class ToyConfig:
    vocab_size: int = 320
    hidden_size: int = 32
    num_hidden_layers: int = 2
    tie_word_embeddings: bool = False
    model_type: str = "toy_lm"

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ToyConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class ToyBlock(nn.Module):
    def __init__(self, c: ToyConfig):
        super().__init__()
        self.mix = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.mix(x))


class ToyBody(nn.Module):
    """Embedding -> token-wise residual blocks -> LayerNorm (a bigram LM: enough for the plumbing)."""

    def __init__(self, c: ToyConfig):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(ToyBlock(c) for _ in range(c.num_hidden_layers))
        self.norm = nn.LayerNorm(c.hidden_size)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor:
        x = self.embed(input_ids)                                            # (B, T, H)
        for layer in self.layers:
            x = layer(x)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.norm(x)


class ToyLM(DecoderLM):
    BODY, HEAD, EMBEDDING = "body", "head", "body.embed"

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.body = ToyBody(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


def load_toy(folder, dtype=torch.float32, device="cpu", config=None) -> ToyLM:
    with torch.device("meta"):
        model = ToyLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = match_keys([SafetensorsFile(p) for p in weight_files(folder)], expected, folder)
    return assign_state(model, read_state(found, dtype, device), folder)


def save_toy(model: ToyLM, folder) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save_folder(state, folder, {"config.json": json.dumps(asdict(model.config))})


TOY = Family(name="toy", title="Toy-LM", model_types=("toy_lm",), config_class=ToyConfig, model_class=ToyLM,
             load_hf=load_toy, save_hf=save_toy, lora_targets=("mix",))


# ------------------------------------------------------------------------------------------------- tests
@pytest.fixture
def toy_folder(tmp_path):
    from neox_fixtures import train_tiny_tokenizer

    register(TOY)
    torch.manual_seed(0)
    folder = save_toy(ToyLM(ToyConfig()), tmp_path / "toy")
    train_tiny_tokenizer(folder)                        # ids < 300 < the toy's 320
    yield folder
    unregister("toy")


def test_a_toy_family_goes_from_loading_to_export(toy_folder, tmp_path, capsys):
    from chat.export import main as export_main
    from infer.models import inspect_model, load_causal_lm
    from infer.sampler import SamplingConfig, generate_ids
    from lora import load_adapter, merge_lora
    from train.sft import run

    assert inspect_model(toy_folder).family is TOY and "toy" in [f.name for f in families()]
    out = run(["--model", str(toy_folder), "--output-dir", str(tmp_path / "sft"), "--max-steps", "1",
               "--batch-size", "4", "--max-length", "48", "--lora-r", "2", "--no-progress", "--eval-prompts", "0"])
    assert out["result"].global_step == 1 and isinstance(out["model"], ToyLM)
    adapter = tmp_path / "sft" / "last"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["mix"] and config["base_model_name_or_path"] == str(toy_folder)

    # greedy sampling with the KV-cache loop = a hand argmax loop over the full sequence
    model, tok = load_causal_lm(toy_folder)
    load_adapter(model, adapter)
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(float(p.detach().abs().sum()) > 0 for p in trained)  # one SFT step moved the adapter
    ids, _ = tok.batch_encode(["안녕! 오늘 하루는"], padding_side="left")
    got = generate_ids(model, ids, config=SamplingConfig(do_sample=False, max_new_tokens=6, no_repeat_ngram_size=0))
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got[0] == seq[0, ids.shape[1]:].tolist()

    # HF export through the family's save_hf: reloads through the registry with the merged logits
    assert export_main(["--adapter", str(adapter), "--hf", str(tmp_path / "export")]) == 0
    exported, _ = load_causal_lm(tmp_path / "export")
    with torch.no_grad():
        want = merge_lora(model).eval()(ids)
        assert torch.equal(exported(ids), want)
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == (toy_folder / "tokenizer.json").read_bytes()
    # no GGUF writer: refused in one line naming the family
    capsys.readouterr()
    assert export_main(["--adapter", str(adapter), "--gguf", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Toy-LM" in err and "--hf" in err and "\n" not in err and not (tmp_path / "x.gguf").exists()


def test_lookups_and_clashes():
    names = [f.name for f in families()]
    assert names[:2] == ["gptneox", "gemma"]
    assert family_for_model_type("gpt_neox").name == "gptneox"
    assert {family_for_model_type(t).name for t in ("gemma2", "gemma3_text", "gemma3")} == {"gemma"}
    assert family_for_model_type("llama") is None
    with pytest.raises(ValueError, match="'gpt_neox' is already read by 'gptneox'"):
        register(Family(name="other", title="Other", model_types=("gpt_neox",), config_class=ToyConfig,
                        model_class=ToyLM, load_hf=load_toy, save_hf=save_toy, lora_targets=("mix",)))
    assert "other" not in [f.name for f in families()]


def test_gguf_family_from_the_header(tmp_path):
    """general.architecture is read from the first header keys (not the whole file); an architecture no family
    reads is one line naming the file; a file cut short falls back to the only GGUF family (whose loader says
    what is wrong)."""
    from gemma_fixtures import tiny_hf_gemma, write_tiny_gguf

    from core.gguf_header import gguf_architecture
    from infer.models import ModelPathError, inspect_model

    hf = tiny_hf_gemma("gemma3", for_gguf=True)
    path = write_tiny_gguf(hf, tmp_path / "g.gguf")
    assert gguf_architecture(path) == "gemma3" and inspect_model(path).family.name == "gemma"
    llama = write_tiny_gguf(hf, tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ModelPathError, match=r"llama.gguf: GGUF general.architecture 'llama' is not supported "
                                             r"\(supported: gemma2, gemma3\)"):
        inspect_model(llama)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:12])
    assert gguf_architecture(cut) is None and inspect_model(cut).family.name == "gemma"
