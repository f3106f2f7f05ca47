"""chat (python -m chat): memory item prepended to the prompt, produced items stored, answers shown without items,
CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chat.cli as chat
from chat.cli import ChatError, ChatSession
from chat.memory import MemoryStore
from data.memory_items import ItemFilter, strip_memory_items
from infer.sampler import SamplingConfig

TEMPLATE_TAIL = " (답변 시작) ### 답변:"


class KeywordEncoder:
    """A stub sentence encoder: one axis per topic keyword, so cosines are exact (1.0 or 0.0)."""
    TOPICS = [("일정", "뭐 해", "계획"), ("음식", "먹", "떡볶이"), ("날씨", "비")]

    def encode(self, texts, batch_size=32):
        out = np.zeros((len(texts), len(self.TOPICS)), dtype=np.float32)   # no keyword: a zero vector (cos 0)
        for i, t in enumerate(texts):
            for j, words in enumerate(self.TOPICS):
                out[i, j] = float(any(w in t for w in words))
        return out


class StubGenerate:
    """Records the prompts and returns a fixed raw answer, streaming it in small pieces as the sampler does."""

    def __init__(self, raw: str):
        self.raw, self.prompts = raw, []

    def __call__(self, model, tokenizer, prompts, config, stream=None, prefix_cache=None):
        self.prompts.extend(prompts)
        if stream is not None:
            for k in range(0, len(self.raw), 3):
                stream(0, self.raw[k:k + 3])
        return [self.raw]


def test_memory_item_prepended_and_produced_item_stored(tmp_path):
    store_path = tmp_path / "memory.txt"
    store_path.write_text("[오늘 일정: 친구랑 카페 방문]\n[오늘 날씨: 하루 종일 비]\n", encoding="utf-8")
    store = MemoryStore.load(store_path, encoder=KeywordEncoder())
    gen = StubGenerate("[좋아하는 음식: 떡볶이] 나도  떡볶이 좋아! 오늘 [기분: 최고] 같이 먹자")
    session = ChatSession(None, None, SamplingConfig(), store, generate_fn=gen)

    pieces: list[str] = []
    reply = session.reply("오늘 뭐 해?", stream=pieces.append)
    assert gen.prompts == ["[오늘 일정: 친구랑 카페 방문] 오늘 뭐 해?" + TEMPLATE_TAIL]
    assert reply.memory == ("[오늘 일정: 친구랑 카페 방문]", pytest.approx(1.0))
    assert reply.answer == "나도 떡볶이 좋아! 오늘 같이 먹자"
    assert "".join(pieces) == reply.answer
    assert reply.stored == ["[좋아하는 음식: 떡볶이]", "[기분: 최고]"]
    assert store_path.read_text(encoding="utf-8").splitlines() == [
        "[오늘 일정: 친구랑 카페 방문]", "[오늘 날씨: 하루 종일 비]", "[좋아하는 음식: 떡볶이]", "[기분: 최고]"]

    # a message about nothing stored: no item prepended; the same item again: nothing new stored
    gen2 = StubGenerate("[기분: 최고] 그렇구나~")
    session.generate_fn = gen2
    reply = session.reply("안녕  하세요")
    assert gen2.prompts == ["안녕 하세요" + TEMPLATE_TAIL]
    assert reply.memory is None and reply.stored == [] and reply.answer == "그렇구나~"
    # the newly stored item is found by the next matching message
    gen3 = StubGenerate("응!")
    session.generate_fn = gen3
    session.reply("저녁 뭐 먹을까")
    assert gen3.prompts == ["[좋아하는 음식: 떡볶이] 저녁 뭐 먹을까" + TEMPLATE_TAIL]


def test_no_memory_search_still_stores(tmp_path):
    store = MemoryStore.load(tmp_path / "m.txt", missing_ok=True)      # no encoder, and search off
    gen = StubGenerate("[취미: 등산] 좋아!")
    session = ChatSession(None, None, None, store, use_memory_search=False, generate_fn=gen)
    reply = session.reply("오늘 뭐 해?")
    assert gen.prompts == ["오늘 뭐 해?" + TEMPLATE_TAIL]
    assert reply.answer == "좋아!" and (tmp_path / "m.txt").read_text(encoding="utf-8") == "[취미: 등산]\n"
    with pytest.raises(ChatError, match="empty message"):
        session.reply("   ")


@pytest.mark.parametrize("text", [
    "[a: b] hi", "hi [a: b]", "  x  [not an item] y [k: v]z  ", "[[a: b] c", "a [b", "[a: b][c: d] e ] [",
    "[키: 값 ]  띄어  쓰기\n끝 [", "no items at all", "",
])
def test_item_filter_stream_equals_strip(text):
    for size in (1, 2, 5):
        out: list[str] = []
        f = ItemFilter(out.append)
        for k in range(0, len(text), size):
            f.feed(text[k:k + size])
        f.close()
        assert "".join(out) == strip_memory_items(text), (text, size)


# ---------------------------------------------------------------------------------------------------------
# CLI with a real tiny model + adapter on disk
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    from gptneox.load import load_model
    from lora import LoRAConfig, inject_lora, save_adapter
    from tests.neox_fixtures import save_tiny_hf_neox, train_tiny_tokenizer

    base = save_tiny_hf_neox(tmp_path_factory.mktemp("base"))
    train_tiny_tokenizer(base)
    model = load_model(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["query_key_value"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = tmp_path_factory.mktemp("adapter")
    save_adapter(model, adapter, base_model_name_or_path=str(base))
    return base, adapter


def test_cli_once_loads_merges_and_stores(model_and_adapter, tmp_path, monkeypatch, capsys):
    base, adapter = model_and_adapter
    seen = {}

    def fake_generate(model, tokenizer, prompts, config, stream=None, prefix_cache=None):
        from core.onednn import PackedLinear, packing_available
        from lora import lora_layers
        seen.update(model=model, prompts=prompts, config=config)
        assert not list(lora_layers(model)) and not model.training        # merged, eval mode
        assert isinstance(model.embed_out, PackedLinear) == packing_available(model.embed_out.weight.dtype)
        return ["[좋아하는 가수: 아이유] 아이유 노래 좋지!"]

    monkeypatch.setattr(chat, "generate", fake_generate)
    monkeypatch.chdir(tmp_path)                      # no runs/ here: no default memory model
    store = tmp_path / "mem.txt"
    rc = chat.main(["--model", str(base), "--adapter", str(adapter), "--memory-store", str(store),
                    "--once", "노래 추천해줘", "--temperature", "0.3", "--max-new-tokens", "12"])
    out = capsys.readouterr()
    assert rc == 0
    assert out.out == "아이유 노래 좋지!\n"
    assert "without memory" in out.err and "(remembered: [좋아하는 가수: 아이유])" in out.err
    assert store.read_text(encoding="utf-8") == "[좋아하는 가수: 아이유]\n"
    assert seen["prompts"] == ["노래 추천해줘" + TEMPLATE_TAIL]
    assert (seen["config"].temperature, seen["config"].max_new_tokens) == (0.3, 12)

    # the merged model's logits equal the unmerged base + adapter's
    from gptneox.load import load_model
    from lora import load_adapter
    ref = load_adapter(load_model(base), adapter).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(seen["model"](ids), ref(ids), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(load_model(base)(ids), ref(ids), atol=1e-3)   # the adapter matters


def test_cli_sqlite_store_keeps_each_user_apart(model_and_adapter, tmp_path, monkeypatch, capsys):
    """`--memory-store X.sqlite --user NAME`: the server's per-user database from the terminal."""
    from chat.memory_db import MemoryDB
    base, adapter = model_and_adapter
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "memory.sqlite"
    for user, raw in [("alice", "[좋아하는 가수: 아이유] 좋아!"), ("bob", "[취미: 등산] 가자!")]:
        monkeypatch.setattr(chat, "generate", StubGenerate(raw))
        assert chat.main(["--model", str(base), "--adapter", str(adapter), "--memory-store", str(db),
                          "--user", user, "--once", "안녕", "--no-pack"]) == 0
    assert capsys.readouterr().out == "좋아!\n가자!\n"
    with MemoryDB(db) as opened:
        assert opened.user("alice").items == ["[좋아하는 가수: 아이유]"]
        assert opened.user("bob").items == ["[취미: 등산]"]


def test_cli_real_generation_runs(model_and_adapter, tmp_path, monkeypatch, capsys):
    base, adapter = model_and_adapter
    monkeypatch.chdir(tmp_path)
    rc = chat.main(["--model", str(base), "--adapter", str(adapter), "--memory-store", str(tmp_path / "m.txt"),
                    "--once", "안녕!", "--max-new-tokens", "8", "--seed", "0", "--max-trials", "2"])
    assert rc == 0
    assert capsys.readouterr().out.endswith("\n")


def test_cli_errors(model_and_adapter, tmp_path, monkeypatch, capsys):
    base, adapter = model_and_adapter
    monkeypatch.chdir(tmp_path)                      # no runs/ here
    assert chat.main(["--model", str(base), "--once", "  "]) == 2
    assert "empty message" in capsys.readouterr().err
    assert chat.main(["--once", "안녕"]) == 2
    err = capsys.readouterr().err
    assert "run `python -m train.sft` first" in err and "Traceback" not in err
    assert chat.main(["--model", str(tmp_path / "nope"), "--once", "안녕"]) == 2
    assert capsys.readouterr().err == f"error: --model: {tmp_path / 'nope'}: folder not found\n"
    assert chat.main(["--model", str(base), "--adapter", str(tmp_path), "--once", "안녕"]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    assert chat.main(["--model", str(base), "--memory-model", str(tmp_path / "x"), "--once", "안녕"]) == 2
    assert capsys.readouterr().err == f"error: --memory-model: {tmp_path / 'x'}: folder not found\n"


def test_cli_default_uses_adapter_base(model_and_adapter, tmp_path, monkeypatch, capsys):
    """With no --model/--adapter: runs/sft/best and the base it names (as train.sft saves them)."""
    import shutil
    base, adapter = model_and_adapter
    monkeypatch.chdir(tmp_path)
    shutil.copytree(adapter, tmp_path / "runs/sft/best")
    monkeypatch.setattr(chat, "generate", StubGenerate("네!"))
    assert chat.main(["--once", "안녕"]) == 0
    assert capsys.readouterr().out == "네!\n"
    assert not (tmp_path / "runs/memory.txt").exists()        # nothing to store: no file written


def test_turns_reuse_the_kv_cache_prefix(model_and_adapter, tmp_path):
    """Real sampler, tiny model: replies with the session's prefix cache equal those without (greedy); the
    shared prefix between turns is what the single-turn template allows — the memory item in front when the
    same item is recalled, else (nearly) nothing — and a prompt repeated is prefilled from its last token."""
    base, adapter = model_and_adapter
    model, tok = chat.load_chat_model(base, adapter)
    cfg = SamplingConfig(do_sample=False, max_new_tokens=10)
    items = "[오늘 일정: 친구랑 카페 방문]\n[오늘 날씨: 하루 종일 비]\n"
    (tmp_path / "a.txt").write_text(items, encoding="utf-8")
    (tmp_path / "b.txt").write_text(items, encoding="utf-8")
    reuse = ChatSession(model, tok, cfg, MemoryStore.load(tmp_path / "a.txt", encoder=KeywordEncoder()))
    fresh = ChatSession(model, tok, cfg, MemoryStore.load(tmp_path / "b.txt", encoder=KeywordEncoder()),
                        reuse_prefix=False)
    messages = ["오늘 뭐 해?", "오늘 계획 있어?", "비 와?", "비 와?"]
    shared, lengths = [], []
    for m in messages:
        a, b = reuse.reply(m), fresh.reply(m)
        assert (a.raw, a.prompt) == (b.raw, b.prompt)
        shared.append(reuse.prefix_cache.reused)
        lengths.append(len(tok.encode(a.prompt)))
        assert reuse.prefix_cache.reused + reuse.prefix_cache.prefilled == len(tok.encode(a.prompt))
    item = len(tok.encode("[오늘 일정: 친구랑 카페 방문]"))
    assert shared[0] == 0 and shared[1] >= item - 1            # the same memory item in front: reused
    assert shared[3] == lengths[3] - 1                          # the same prompt again
    print(f"\nprompt tokens reused / prompt length per turn: {list(zip(shared, lengths))}")
    assert fresh.prefix_cache is None                          # every turn prefilled in full


def test_default_base_may_be_a_gguf_file(tmp_path, monkeypatch):
    """train.sft's Gemma default records the .gguf file as the adapter's base: chat resolves it as is, and an
    adapter naming a missing base falls back to runs/sft/base (the tiny default)."""
    import json
    monkeypatch.chdir(tmp_path)
    gguf = tmp_path / "gemma.gguf"
    gguf.write_bytes(b"GGUF" + bytes(28))
    adapter = tmp_path / "runs/sft/best"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(gguf)}))
    assert chat.resolve_model_dirs(None, None) == (gguf, chat.DEFAULT_ADAPTER)
    assert chat.resolve_model_dirs(str(gguf), None) == (gguf, None)          # --model FILE.gguf
    gguf.unlink()
    with pytest.raises(ChatError, match="is not here"):
        chat.resolve_model_dirs(None, None)
    (tmp_path / "runs/sft/base").mkdir()
    (tmp_path / "runs/sft/base/config.json").write_text("{}")
    assert chat.resolve_model_dirs(None, None) == (chat.DEFAULT_BASE, chat.DEFAULT_ADAPTER)
    # a malformed adapter_config.json is said (lora.io reads it), not taken for "no base recorded"
    from lora import AdapterError
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        chat.resolve_model_dirs(None, None)
