"""`python -m chat.export`: a LoRA adapter merged into a tiny Gemma base (a GGUF written as llama.cpp writes one,
or the HF folder gemma.convert makes of it), exported as GGUF (F16 / BF16 / Q8_0) and as an HF folder, read back
by transformers (its GGUF loader and from_pretrained) and by our own reader; bad input."""
import numpy as np
import pytest
import torch

import lora
from chat.export import main as export_main
from gemma import GGUFFile, load_gguf
from gemma.convert import convert
from gemma_fixtures import WINDOW, tiny_hf_gemma, write_tiny_gguf
from lora_fixtures import randomize_lora

# Measured on these tiny models (weights 3x HF's init, max |logit| ~2; fp32 compute), asserted with margin:
# the file's values are read exactly (vs the merged model with its 2-D weights rounded to the file's type: 0);
# the rounding itself, vs the fp32 merged model: F16 3.1e-3, BF16 3.7e-2, Q8_0 7.9e-2 (Gemma 3).
EXACT = 1e-3  # transformers' GGUF loader vs the merged model as the file stores it (the issue's bound)
VS_FP32 = {"f16": 1e-2, "bf16": 0.1, "q8_0": 0.2}
ROUND = {"f16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module", params=("gemma3", "gemma2"))
def base(request, tmp_path_factory):
    """(kind, base .gguf, adapter folder recording it, ids, merged model, merged logits, base logits)."""
    kind, d = request.param, tmp_path_factory.mktemp(request.param)
    src = write_tiny_gguf(tiny_hf_gemma(kind, for_gguf=True), d / "base.gguf")
    model = load_gguf(src)
    ids = torch.randint(5, model.config.vocab_size, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = model(ids)
    lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, target_modules=list(model.LORA_TARGETS)))
    randomize_lora(model, seed=3)
    lora.save_adapter(model, d / "adapter", base_model_name_or_path=str(src))  # as train.sft records it
    merged = lora.merge_lora(model).eval()
    with torch.no_grad():
        want = merged(ids)
    assert (want - base_logits).abs().max() > 1e-2  # the adapter matters
    return kind, src, d / "adapter", ids, merged, want


def rounded(merged, kind: str):
    """The merged model with every 2-D weight rounded as the file stores it (F16 / BF16 casts; Q8_0 through
    gguf's own quantize + dequantize, rows of 32 values with one f16 scale)."""
    import copy

    import gguf
    from gguf.quants import dequantize, quantize
    out = copy.deepcopy(merged)
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() != 2:
                continue
            if kind == "q8_0":
                w = p.numpy()
                p.copy_(torch.from_numpy(dequantize(quantize(w, q8), q8).reshape(w.shape)))
            else:
                p.copy_(p.to(ROUND[kind]).float())
    return out


@torch.no_grad()
def hf_gguf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return ref(input_ids=ids).logits


def diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_f16_gguf_in_transformers(base, tmp_path, one_thread, capsys):
    kind, src, adapter, ids, merged, want = base
    out = tmp_path / "oh-lora-f16.gguf"
    assert export_main(["--adapter", str(adapter), "--gguf", str(out), "--type", "f16"]) == 0
    assert "wrote" in capsys.readouterr().out
    got = hf_gguf_logits(out, ids)
    with torch.no_grad():
        stored = rounded(merged, "f16")(ids)
    assert diff(got, stored) < EXACT, f"{kind}: transformers' GGUF loader vs the F16 merged model"
    assert diff(got, want) < VS_FP32["f16"], f"{kind}: F16 export vs the fp32 merged model"
    f = GGUFFile.open(out)
    assert f.config() == merged.config  # metadata says the same model
    types = {i.name: i.qtype.name for i in f.tensors.values()}
    assert {t for n, t in types.items() if n.endswith("norm.weight")} == {"F32"}
    assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {"F16"}
    source = GGUFFile.open(src).metadata
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        assert np.array_equal(np.asarray(f.metadata[key].tolist() if key.endswith("tokens") else f.metadata[key]),
                              np.asarray(source[key].tolist() if key.endswith("tokens") else source[key])), key
    assert all(f.metadata[k] == v for k, v in source.items() if k.startswith("tokenizer.") and
               isinstance(v, (bool, int, str)))


@pytest.mark.parametrize("kind", ["bf16", "q8_0"])
def test_bf16_and_q8_0_read_back_by_transformers_and_ours(base, tmp_path, kind, one_thread):
    model_kind, _, adapter, ids, merged, want = base
    if model_kind != "gemma3":
        pytest.skip("one family is enough for the other tensor types")
    out = tmp_path / f"oh-lora-{kind}.gguf"
    assert export_main(["--adapter", str(adapter), "--gguf", str(out), "--type", kind]) == 0
    types = {i.qtype.name for i in GGUFFile.open(out).tensors.values() if not i.name.endswith("norm.weight")}
    assert types == {kind.upper()}
    ours = load_gguf(out)
    with torch.no_grad():
        back = ours(ids)
    got = hf_gguf_logits(out, ids)
    assert diff(back, got) < 1e-4  # both readers read the same values
    with torch.no_grad():  # the file holds the merged weights as rounded by its type, nothing else
        assert diff(back, rounded(merged, kind)(ids)) < EXACT
    assert diff(back, want) < VS_FP32[kind], f"{kind} export vs the fp32 merged model"


def test_hf_folder_export_loads_in_transformers(base, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma import tokenizer_from_gguf

    _, src, adapter, ids, _, want = base
    out = tmp_path / "hf"
    assert export_main(["--adapter", str(adapter), "--hf", str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert diff(hf(input_ids=ids).logits, want) < 1e-4
    text = "안녕하세요 hello  abc\n\n오늘 카페에!"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tokenizer_from_gguf(src).encode(text).ids


def test_hf_folder_base_to_gguf(base, tmp_path, one_thread):
    """--model overrides the recorded base; an HF folder's tokenizer.json becomes the GGUF's tokenizer metadata
    (the pieces and token types of the original GGUF come back)."""
    kind, src, adapter, ids, merged, want = base
    if kind != "gemma3":
        pytest.skip("one family is enough")
    folder = convert(src, tmp_path / "base-hf")
    out = tmp_path / "from-folder.gguf"
    assert export_main(["--adapter", str(adapter), "--model", str(folder), "--gguf", str(out)]) == 0
    meta, source = GGUFFile.open(out).metadata, GGUFFile.open(src).metadata
    assert meta["tokenizer.ggml.tokens"].tolist() == source["tokenizer.ggml.tokens"].tolist()
    assert np.array_equal(meta["tokenizer.ggml.token_type"], source["tokenizer.ggml.token_type"])
    with torch.no_grad():
        assert diff(hf_gguf_logits(out, ids), rounded(merged, "f16")(ids)) < EXACT


def test_bad_input(base, tmp_path, capsys):
    _, _, adapter, _, _, _ = base
    assert export_main(["--adapter", str(tmp_path / "nope"), "--gguf", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--adapter" in err and "\n" not in err
    assert export_main(["--adapter", str(adapter), "--gguf", str(tmp_path / "x.gguf"), "--type", "q4_k"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--type" in err and "q4_k" in err and "\n" not in err
    assert export_main(["--adapter", str(adapter), "--hf", str(tmp_path / "out"), "--type", "q8_0"]) == 2
    assert "--type" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "out").exists()


def test_neox_base_is_refused_for_gguf(tmp_path, capsys):
    from neox_fixtures import save_tiny_hf_neox

    folder = save_tiny_hf_neox(tmp_path / "neox")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "%s"}' % folder)
    capsys.readouterr()
    assert export_main(["--adapter", str(tmp_path / "adapter"), "--gguf", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Gemma" in err and "--hf" in err and "\n" not in err


def test_neox_base_exports_an_hf_folder(tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    from gptneox import load_model
    from neox_fixtures import save_tiny_hf_neox, train_tiny_tokenizer

    folder = save_tiny_hf_neox(tmp_path / "neox")
    train_tiny_tokenizer(folder)
    model = load_model(folder)
    lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8))
    randomize_lora(model, seed=4)
    lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(folder))
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(ids)
    assert export_main(["--adapter", str(tmp_path / "adapter"), "--hf", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert diff(hf(input_ids=ids).logits, want) < 1e-4


def test_settings_gguf_cannot_carry_are_refused(tmp_path):
    """The tiny test Gemma-3 (1:1 sliding pattern, local rope base 50) would run wrong in llama.cpp: refused."""
    from gemma import GGUFError, load_model
    from gemma.gguf_write import write_gguf
    from gemma_fixtures import save_tiny_hf_gemma

    model = load_model(save_tiny_hf_gemma(tmp_path / "m", "gemma3"))
    with pytest.raises(GGUFError, match="cannot be written as GGUF: layer_types .*rope_local_base_freq 50"):
        write_gguf(model, tmp_path / "x.gguf", "f16", metadata={})
    assert not (tmp_path / "x.gguf").exists()


def test_adapter_without_a_recorded_base_needs_model(tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": null}')
    assert export_main(["--adapter", str(tmp_path / "adapter"), "--hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "base_model_name_or_path" in err and "--model" in err and "\n" not in err
