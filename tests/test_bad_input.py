"""Malformed input against every CLI, in-process: each must end with exit code 2, exactly one stderr line
`error: <file or flag>: <problem>` naming the file or flag, no traceback, and no output left half-written.

Covers flags (numbers, devices, paths, choices), CSVs (SFT and pairs), combination files, GPT-NeoX model
folders (config.json, safetensors: truncated / garbage / wrong shape / NaN / missing tensors / pickle),
tokenizers (garbage, missing, ids beyond the vocabulary, bad special tokens), adapters, sentence-encoder
folders (modules.json, pooling, config, weights) and memory stores. Tiny models are built once per module with
our own code (no transformers import): the whole file runs in a few seconds.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import chat.cli
import chat.memory
import data.memory_pairs
import sbert.evaluate
import sbert.train
import train.sft
from tests.neox_fixtures import train_tiny_tokenizer
from tests.sbert_fixtures import train_tiny_wordpiece

pytestmark = pytest.mark.usefixtures("one_thread")
NO_CUDA = not torch.cuda.is_available()


# ------------------------------------------------------------------------------------------- tiny folders
@pytest.fixture(scope="module")
def w(tmp_path_factory) -> "Workspace":
    root = tmp_path_factory.mktemp("bad_input")
    return Workspace.build(root)


@dataclass
class Workspace:
    root: Path
    neox: Path       # GPT-NeoX folder: config.json, model.safetensors, tokenizer.json (ids < 300 < vocab 320)
    adapter: Path    # a PEFT LoRA adapter for it
    encoder: Path    # a sentence-transformers folder (modules.json, pooling, normalize)
    sft_csv: Path
    pairs_csv: Path
    combs: Path

    @classmethod
    def build(cls, root: Path) -> "Workspace":
        from gptneox.config import GPTNeoXConfig
        from gptneox.load import save_pretrained
        from gptneox.model import GPTNeoXForCausalLM
        from lora import LoRAConfig, inject_lora, save_adapter
        from bert.encoder import BertEncoder, EncoderConfig, init_weights
        from bert.model import SentenceEncoder
        from bert.tokenizer import SentenceTokenizer

        torch.manual_seed(0)
        neox = root / "neox"
        config = GPTNeoXConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64)
        model = GPTNeoXForCausalLM(config).eval()
        save_pretrained(model, neox)
        train_tiny_tokenizer(neox)
        inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["query_key_value"]))
        adapter = save_adapter(model, root / "adapter", base_model_name_or_path=str(neox))

        tok_dir = train_tiny_wordpiece(root / "wordpiece")
        vocab = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
        enc_cfg = EncoderConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32, pad_token_id=1)
        encoder = SentenceEncoder(init_weights(BertEncoder(enc_cfg), seed=0),
                                  SentenceTokenizer.from_folder(tok_dir, max_seq_length=32, fallback_pad_id=1),
                                  normalize=True).save(root / "encoder")

        sft_csv = root / "sft.csv"
        sft_csv.write_text("split,input_data,output_data\ntrain,안녕,안녕! 반가워\nvalid,뭐 해?,쉬는 중이야\n",
                           encoding="utf-8")
        pairs_csv = root / "pairs.csv"
        pairs_csv.write_text("memory_0,user_prompt_1,similarity_score\n[취미: 등산] ,주말에 뭐 해?,1.0\n"
                             "[음식: 떡볶이],오늘 뭐 먹지?,0.5\n", encoding="utf-8")
        combs = root / "combs.txt"
        combs.write_text("[오늘 일정: 카페] 오늘 뭐 해?\n[좋아하는 음식: 떡볶이] 뭐 먹지?\n", encoding="utf-8")
        return cls(root, neox, adapter, encoder, sft_csv, pairs_csv, combs)

    def copy(self, name: str, tmp: Path) -> Path:
        dst = tmp / name
        shutil.copytree(getattr(self, name), dst)
        return dst


# -------------------------------------------------------------------------------------------- corruptions
def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_tensors(path: Path, change: Callable[[dict], None]) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_json(path: Path, change: Callable[[object], object]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")


def extend_tokenizer(folder: Path, n: int = 40) -> None:
    """Add tokens past the model's vocabulary (ids 300..339 for vocab_size 320): a foreign tokenizer."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(n)])
    tok.save(str(folder / "tokenizer.json"))


def first_float(tensors: dict) -> str:
    return next(k for k, v in sorted(tensors.items()) if v.is_floating_point())


def nan_first(tensors: dict) -> None:
    tensors[first_float(tensors)].view(-1)[0] = float("nan")


def inf_first(tensors: dict) -> None:
    tensors[first_float(tensors)].view(-1)[-1] = float("inf")


def reshape_first(tensors: dict) -> None:
    key = first_float(tensors)
    tensors[key] = torch.zeros(3, 5)


def drop_first(tensors: dict) -> None:
    del tensors[first_float(tensors)]


# ------------------------------------------------------------------------------------------------ the cases
SFT, CHAT, MEMORY, SBERT_TRAIN, EVALUATE, PAIRS = (train.sft.main, chat.cli.main, chat.memory.main,
                                                  sbert.train.main, sbert.evaluate.main, data.memory_pairs.main)
CASES: dict[str, Callable] = {}


def case(name: str, *, skip: str | None = None):
    """Register `make(w, tmp) -> (main, argv, names, outputs)`: the error line must contain `names` (the flag
    or file), and no path in `outputs` may exist afterwards."""
    def register(make):
        CASES[name] = pytest.param(make, id=name, marks=pytest.mark.skipif(bool(skip), reason=skip or ""))
        return make
    return register


def sft(w, tmp, *flags):  # train.sft on the tiny folder: every case fails before any training step
    return [*flags] + (["--model", str(w.neox)] if "--model" not in flags else []) + \
        ["--data", str(w.sft_csv)] * ("--data" not in flags) + ["--output-dir", str(tmp / "out")] * (
            "--output-dir" not in flags) + ["--max-steps", "1", "--no-progress", "--eval-prompts", "0"] * (
            "--max-steps" not in flags)


# flags: numbers taken on trust before (issue 13), devices, paths, choices ------------------------------------
for flag, value in [("--epochs", "0"), ("--epochs", "-2"), ("--max-steps", "-3"), ("--max-steps", "0"),
                    ("--max-length", "-5"), ("--warmup-ratio", "5"), ("--warmup-ratio", "-1"),
                    ("--save-state-steps", "-1"), ("--threads", "-1"), ("--lr", "inf"), ("--lr", "nan"),
                    ("--max-grad-norm", "nan"), ("--batch-size", "0"), ("--grad-accum", "0"), ("--lora-r", "0"),
                    ("--lora-dropout", "1.5"), ("--epochs", "abc"), ("--dtype", "fp16"), ("--device", "bogus")]:
    case(f"sft {flag} {value}")(lambda w, tmp, flag=flag, value=value:
                                (SFT, sft(w, tmp, flag, value), [flag], [tmp / "out"]))
case("sft --device cuda on a CPU build", skip=None if NO_CUDA else "CUDA present")(
    lambda w, tmp: (SFT, sft(w, tmp, "--device", "cuda"), ["--device"], [tmp / "out"]))
case("sft --fp16 on CPU", skip=None if NO_CUDA else "CUDA present")(
    lambda w, tmp: (SFT, sft(w, tmp, "--fp16"), ["--fp16"], [tmp / "out"]))
case("sft unknown flag")(lambda w, tmp: (SFT, sft(w, tmp, "--lora-rank", "4"), ["--lora-rank"], [tmp / "out"]))


@case("sft --output-dir is a file")
def _(w, tmp):
    (tmp / "out").write_text("x")
    return SFT, sft(w, tmp, "--output-dir", str(tmp / "out")), ["--output-dir", str(tmp / "out")], []


@case("sft --output-dir under a file")
def _(w, tmp):
    (tmp / "file").write_text("x")
    return SFT, sft(w, tmp, "--output-dir", str(tmp / "file" / "out")), ["--output-dir", str(tmp / "file")], []


for flag, value in [("--limit", "0"), ("--threads", "-1"), ("--lr", "-1"), ("--valid-ratio", "1"),
                    ("--epochs", "0"), ("--max-length", "1"), ("--batch-size", "0")]:
    case(f"sbert.train {flag} {value}")(lambda w, tmp, flag=flag, value=value: (
        SBERT_TRAIN, [flag, value, "--output-dir", str(tmp / "out"), "--test", ""], [flag], [tmp / "out"]))
case("sbert.train --model missing")(lambda w, tmp: (
    SBERT_TRAIN, ["--model", str(tmp / "nope"), "--output-dir", str(tmp / "out")], [str(tmp / "nope")],
    [tmp / "out"]))

for flag, value in [("--temperature", "nan"), ("--repetition-penalty", "nan"), ("--top-p", "0"),
                    ("--top-k", "-1"), ("--max-new-tokens", "0"), ("--max-trials", "0"), ("--dtype", "fp16")]:
    case(f"chat {flag} {value}")(lambda w, tmp, flag=flag, value=value: (
        CHAT, ["--model", str(w.neox), "--once", "안녕", "--memory-store", str(tmp / "m.txt"), flag, value],
        [flag], [tmp / "m.txt"]))


@case("chat --memory-store is a folder")
def _(w, tmp):
    (tmp / "store").mkdir()
    return CHAT, ["--model", str(w.neox), "--once", "안녕", "--memory-store", str(tmp / "store")], \
        ["--memory-store", str(tmp / "store")], []


for flag, value in [("--threshold", "nan"), ("--threshold", "2"), ("--top", "0")]:
    case(f"chat.memory {flag} {value}")(lambda w, tmp, flag=flag, value=value: (
        MEMORY, ["--query", "안녕", "--model", str(w.encoder), flag, value], [flag], []))
case("chat.memory without --query")(lambda w, tmp: (MEMORY, ["--model", str(w.encoder)], ["--query"], []))
case("evaluate --batch-size 0")(lambda w, tmp: (
    EVALUATE, ["--model", str(w.encoder), "--data", str(w.pairs_csv), "--batch-size", "0"], ["--batch-size"], []))
case("evaluate without --model")(lambda w, tmp: (EVALUATE, ["--data", str(w.pairs_csv)], ["--model"], []))


# SFT CSVs ---------------------------------------------------------------------------------------------------
def sft_data(name: str, content: bytes | str):
    @case(f"sft csv: {name}")
    def make(w, tmp):
        path = tmp / "data.csv"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return SFT, sft(w, tmp, "--data", str(path)), [str(path)], [tmp / "out"]


sft_data("not UTF-8", "input_data,output_data\n안녕,반가워\n".encode("cp949"))
sft_data("empty file", "")
sft_data("missing column", "question,answer\n안녕,반가워\n")
sft_data("unknown split", "split,input_data,output_data\nholdout,안녕,반가워\n")
sft_data("no answers", "input_data,output_data\n안녕,\n뭐 해?,\n")
sft_data("only 100k-character questions", "input_data,output_data\n" + "가" * 100_000 + ",반가워\n")
case("sft --data is a folder")(lambda w, tmp: (SFT, sft(w, tmp, "--data", str(tmp)), ["--data", str(tmp)],
                                               [tmp / "out"]))


# pairs CSVs (sbert.evaluate, sbert.train) ---------------------------------------------------------------------
def pairs(name: str, content: bytes | str, cli: str = "evaluate"):
    @case(f"{cli} pairs csv: {name}")
    def make(w, tmp):
        path = tmp / "pairs.csv"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        if cli == "evaluate":
            return EVALUATE, ["--model", str(w.encoder), "--data", str(path), "--plot", str(tmp / "p.png")], \
                [str(path)], [tmp / "p.png"]
        return SBERT_TRAIN, ["--model", str(w.encoder), "--data", str(path), "--test", "", "--output-dir",
                             str(tmp / "out"), "--no-progress"], [str(path)], [tmp / "out" / "best"]


HEAD = "memory_0,user_prompt_1,similarity_score\n"
pairs("missing column", "memory_0,user_prompt_1\n[a: b],c\n")
pairs("non-numeric score", HEAD + "[a: b],c,high\n")
pairs("NaN score", HEAD + "[a: b],c,1.0\n[a: b],d,nan\n")
pairs("inf score", HEAD + "[a: b],c,inf\n")
pairs("not UTF-8", (HEAD + "[취미: 등산],주말에 뭐 해?,1.0\n").encode("cp949"))
pairs("header only", HEAD)
pairs("empty file", "")
pairs("NaN score", HEAD + "[a: b],c,1.0\n[a: b],d,nan\n", cli="sbert.train")
pairs("missing column", "memory_0,score\n[a: b],1\n", cli="sbert.train")


# combination files (data.memory_pairs) --------------------------------------------------------------------------
def combs(name: str, content: bytes | str):
    @case(f"memory_pairs combs: {name}")
    def make(w, tmp):
        path = tmp / "combs.txt"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return PAIRS, [str(path), str(tmp / "out.csv")], [str(path)], [tmp / "out.csv"]


combs("malformed line", "[오늘 일정: 카페] 오늘 뭐 해?\n오늘 일정 카페\n")
combs("not UTF-8", "[오늘 일정: 카페] 오늘 뭐 해?\n".encode("cp949"))
combs("empty file", "\n\n")
combs("empty memory value", "[오늘 일정: ] 오늘 뭐 해?\n")
case("memory_pairs combs missing")(lambda w, tmp: (PAIRS, [str(tmp / "nope.txt"), str(tmp / "out.csv")],
                                                   [str(tmp / "nope.txt")], [tmp / "out.csv"]))


@case("memory_pairs output is a folder")
def _(w, tmp):
    (tmp / "out.csv").mkdir()
    return PAIRS, [str(w.combs), str(tmp / "out.csv")], [str(tmp / "out.csv")], []


@case("memory_pairs output under a file")
def _(w, tmp):
    (tmp / "f").write_text("x")
    return PAIRS, [str(w.combs), str(tmp / "f" / "out.csv")], [str(tmp / "f")], []


# GPT-NeoX model folders and tokenizers (train.sft and chat load them) -----------------------------------------
def neox(name: str, corrupt: Callable[[Path], None], names: Callable[[Path], list[str]], cli: str = "sft"):
    @case(f"{cli} model: {name}")
    def make(w, tmp):
        folder = w.copy("neox", tmp)
        corrupt(folder)
        expect = names(folder)
        if cli == "sft":
            return SFT, sft(w, tmp, "--model", str(folder)), expect, [tmp / "out"]
        return CHAT, ["--model", str(folder), "--once", "안녕", "--memory-store", str(tmp / "m.txt"), "--no-memory"], \
            expect, [tmp / "m.txt"]


ST = "model.safetensors"
neox("no config.json", lambda f: (f / "config.json").unlink(), lambda f: [str(f)])
neox("config.json invalid JSON", lambda f: (f / "config.json").write_text("{oops"), lambda f: [str(f / "config.json")])
neox("config.json incomplete", lambda f: edit_json(f / "config.json", lambda d: {k: v for k, v in d.items()
                                                                                  if k != "hidden_size"}),
     lambda f: [str(f / "config.json")])
neox("config.json heads do not divide", lambda f: edit_json(f / "config.json", lambda d: {**d,
                                                                                         "num_attention_heads": 5}),
     lambda f: [str(f / "config.json"), "num_attention_heads"])
neox("config.json is a list", lambda f: edit_json(f / "config.json", lambda d: [d]), lambda f: [str(f / "config.json")])
neox("config.json not UTF-8", lambda f: (f / "config.json").write_bytes(b'{"vocab_size": "\xff\xfe"}'),
     lambda f: [str(f / "config.json")])
neox("truncated safetensors", lambda f: truncate(f / ST), lambda f: [str(f / ST)])
neox("garbage safetensors", lambda f: (f / ST).write_bytes(b"\x93NUMPY garbage" * 20), lambda f: [str(f / ST)])
neox("wrong tensor shape", lambda f: edit_tensors(f / ST, reshape_first), lambda f: [str(f), "shape"])
neox("missing tensor", lambda f: edit_tensors(f / ST, drop_first), lambda f: [str(f), "missing"])
neox("NaN weights", lambda f: edit_tensors(f / ST, nan_first), lambda f: [str(f / ST), "NaN"])
neox("inf weights", lambda f: edit_tensors(f / ST, inf_first), lambda f: [str(f / ST), "NaN/inf"])
neox("only pickle weights", lambda f: (f / ST).rename(f / "pytorch_model.bin"), lambda f: [str(f), "pickle"])
neox("garbage tokenizer.json", lambda f: (f / "tokenizer.json").write_text("{not a tokenizer"),
     lambda f: [str(f / "tokenizer.json")])
neox("no tokenizer.json", lambda f: (f / "tokenizer.json").unlink(), lambda f: [str(f), "tokenizer.json"])
neox("tokenizer ids beyond vocab_size", extend_tokenizer, lambda f: [str(f / "tokenizer.json"), str(f / "config.json")])
neox("tokenizer_config.json invalid", lambda f: (f / "tokenizer_config.json").write_text("[1,"),
     lambda f: [str(f / "tokenizer_config.json")])
neox("eos token not in vocabulary", lambda f: edit_json(f / "tokenizer_config.json", lambda d: {**d,
                                                                                               "eos_token": "<nope>"}),
     lambda f: [str(f), "<nope>"])
neox("NaN weights", lambda f: edit_tensors(f / ST, nan_first), lambda f: [str(f / ST), "NaN"], cli="chat")
neox("truncated safetensors", lambda f: truncate(f / ST), lambda f: [str(f / ST)], cli="chat")
neox("tokenizer ids beyond vocab_size", extend_tokenizer, lambda f: [str(f / "tokenizer.json"), str(f / "config.json")],
     cli="chat")


# adapters (chat --adapter) -------------------------------------------------------------------------------------
def adapter(name: str, corrupt: Callable[[Path], None], names: Callable[[Path], list[str]]):
    @case(f"chat adapter: {name}")
    def make(w, tmp):
        folder = w.copy("adapter", tmp)
        corrupt(folder)
        return CHAT, ["--model", str(w.neox), "--adapter", str(folder), "--once", "안녕", "--no-memory",
                      "--memory-store", str(tmp / "m.txt")], names(folder), [tmp / "m.txt"]


AW, AC = "adapter_model.safetensors", "adapter_config.json"
adapter("no adapter_config.json", lambda f: (f / AC).unlink(), lambda f: [str(f / AC)])
adapter("adapter_config.json invalid", lambda f: (f / AC).write_text("{"), lambda f: [str(f / AC)])
adapter("DoRA adapter", lambda f: edit_json(f / AC, lambda d: {**d, "use_dora": True}), lambda f: [str(f / AC),
                                                                                                   "use_dora"])
adapter("truncated weights", lambda f: truncate(f / AW), lambda f: [str(f / AW)])
adapter("NaN weights", lambda f: edit_tensors(f / AW, nan_first), lambda f: [str(f / AW), "NaN"])
adapter("rank does not match", lambda f: edit_json(f / AC, lambda d: {**d, "r": 3}), lambda f: [str(f / AW), "r=3"])
adapter("no weights file", lambda f: (f / AW).unlink(), lambda f: [str(f / AW)])
case("chat --adapter missing")(lambda w, tmp: (CHAT, ["--model", str(w.neox), "--adapter", str(tmp / "nope"),
                                                      "--once", "안녕"], ["--adapter", str(tmp / "nope")], []))


# sentence-encoder folders (sbert.evaluate, chat.memory, chat --memory-model) -------------------------------------
def encoder(name: str, corrupt: Callable[[Path], None], names: Callable[[Path], list[str]], cli: str = "evaluate"):
    @case(f"{cli} encoder: {name}")
    def make(w, tmp):
        folder = w.copy("encoder", tmp)
        corrupt(folder)
        if cli == "evaluate":
            return EVALUATE, ["--model", str(folder), "--data", str(w.pairs_csv), "--plot", str(tmp / "p.png")], \
                names(folder), [tmp / "p.png"]
        if cli == "chat":
            return CHAT, ["--model", str(w.neox), "--memory-model", str(folder), "--once", "안녕",
                          "--memory-store", str(tmp / "m.txt")], names(folder), [tmp / "m.txt"]
        return MEMORY, ["--query", "안녕", "--model", str(folder)], names(folder), []


encoder("truncated model.safetensors", lambda f: truncate(f / ST, 0.7), lambda f: [str(f / ST)])
encoder("garbage model.safetensors", lambda f: (f / ST).write_bytes(b"\0" * 64), lambda f: [str(f / ST)])
encoder("NaN weights", lambda f: edit_tensors(f / ST, nan_first), lambda f: [str(f / ST), "NaN"])
encoder("wrong tensor shape", lambda f: edit_tensors(f / ST, reshape_first), lambda f: [str(f), "shape"])
encoder("modules.json of strings", lambda f: edit_json(f / "modules.json", lambda d: [m["type"] for m in d]),
        lambda f: [str(f / "modules.json")])
encoder("modules.json is an object", lambda f: edit_json(f / "modules.json", lambda d: {"modules": d}),
        lambda f: [str(f / "modules.json")])
encoder("modules.json invalid", lambda f: (f / "modules.json").write_text("[{"), lambda f: [str(f / "modules.json")])
encoder("CLS pooling", lambda f: edit_json(f / "1_Pooling" / "config.json", lambda d: {
    **d, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}),
        lambda f: [str(f / "1_Pooling" / "config.json")])
encoder("config.json model_type gpt2", lambda f: edit_json(f / "config.json", lambda d: {**d, "model_type": "gpt2"}),
        lambda f: [str(f / "config.json")])
encoder("config.json negative hidden_size", lambda f: edit_json(f / "config.json", lambda d: {**d,
                                                                                              "hidden_size": -16}),
        lambda f: [str(f / "config.json"), "hidden_size"])
encoder("config.json not UTF-8", lambda f: (f / "config.json").write_bytes(b"{\"model_type\": \"\xff\"}"),
        lambda f: [str(f / "config.json")])
encoder("no config.json", lambda f: (f / "config.json").unlink(), lambda f: [str(f / "config.json")])
encoder("garbage tokenizer.json", lambda f: (f / "tokenizer.json").write_text("{]"),
        lambda f: [str(f / "tokenizer.json")])
encoder("truncated model.safetensors", lambda f: truncate(f / ST, 0.7), lambda f: [str(f / ST)], cli="memory")
encoder("no modules.json (a plain HF folder)", lambda f: (f / "modules.json").unlink(),
        lambda f: [str(f), "modules.json"], cli="memory")
encoder("no modules.json (a plain HF folder)", lambda f: (f / "modules.json").unlink(),
        lambda f: [str(f), "modules.json"], cli="chat")
encoder("modules.json of strings", lambda f: edit_json(f / "modules.json", lambda d: [m["type"] for m in d]),
        lambda f: [str(f / "modules.json")], cli="chat")


# memory stores (chat.memory --memory-store) ---------------------------------------------------------------------
def store(name: str, filename: str, content: bytes | str):
    @case(f"memory store: {name}")
    def make(w, tmp):
        path = tmp / filename
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return MEMORY, ["--query", "안녕", "--model", str(w.encoder), "--memory-store", str(path)], [str(path)], []


store("line without brackets", "m.txt", "[취미: 등산]\n좋아하는 음식 떡볶이\n")
store("JSON object, not a list", "m.json", '{"취미": "등산"}')
store("invalid JSON", "m.json", '["[취미: 등산]",')
store("not UTF-8", "m.txt", "[취미: 등산]\n".encode("cp949"))
case("memory store is a folder")(lambda w, tmp: (MEMORY, ["--query", "안녕", "--model", str(w.encoder),
                                                          "--memory-store", str(tmp)], ["--memory-store", str(tmp)],
                                                 []))
case("memory store missing")(lambda w, tmp: (MEMORY, ["--query", "안녕", "--model", str(w.encoder),
                                                      "--memory-store", str(tmp / "nope.txt")],
                                             [str(tmp / "nope.txt")], []))


# --------------------------------------------------------------------------------------------------- the test
@pytest.mark.parametrize("make", list(CASES.values()))
def test_bad_input_is_one_clear_line(make, w, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ defaults are found or written
    main, argv, names, outputs = make(w, tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit code {rc}, stderr: {err}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    for path in outputs:
        assert not path.exists(), f"{path} was written"
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"


def test_enough_cases():
    assert len(CASES) >= 60
