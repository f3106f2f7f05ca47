"""Run every ```python block of docs/lora.md, in order, in one namespace: the doc's asserts are its claims."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "lora.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_doc_has_the_promised_sections_and_snippets():
    text = DOC.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    assert len(blocks) >= 10
    for needle in ("100,663,296", "25,165,824", "Why B starts at zero", "What α/r does", "Merging"):
        assert needle in text


def test_doc_snippets_run(capsys):
    namespace: dict = {"__name__": "lora_docs"}
    for i, block in enumerate(python_blocks(DOC.read_text(encoding="utf-8"))):
        code = compile(block, f"docs/lora.md[python block {i + 1}]", "exec")
        exec(code, namespace)  # noqa: S102 -- our own documentation
    assert namespace["four"].trainable == 100_663_296      # the blocks really ran to the end
    assert namespace["qkv_only"].trainable == 25_165_824
