"""Write a SentencePiece `precompiled_charsmap` (what `tokenizers.normalizers.Precompiled` reads) from a str->str map.

Blob layout (sentencepiece's normalizer spec, read by the `spm_precompiled` crate inside `tokenizers`):

    u32 trie_bytes | trie: u32 units[trie_bytes / 4] | normalized: replacement strings, UTF-8, each NUL-terminated

The trie is a darts-clone double array over the UTF-8 bytes of each key. Unit bits: 0-7 label, 8 has_leaf,
9 offset-is-shifted, 10-30 offset, 31 is_leaf. A node at position p with offset o has its children at
`(p ^ o) ^ byte` (the child unit's label must equal the byte) and, when has_leaf, its value unit at `p ^ o`
(the label-0 slot): value = the byte offset of the replacement in `normalized`, with bit 31 set.

Readers index `array[base ^ byte]` for any byte, so the array is padded to whole 256-unit blocks, and every node
gets its own base (two nodes sharing a base would let a lookup of one land on the other's child).
"""
from __future__ import annotations

import struct
from collections import deque

MAX_OFFSET = 1 << 21  # offsets this small need no shift bit; a ~10k-node trie never comes close
IS_LEAF, HAS_LEAF = 1 << 31, 1 << 8


def build_precompiled_charsmap(mapping: dict[str, str]) -> bytes:
    """The charsmap blob that normalizes each key of `mapping` to its value (keys: non-empty strings)."""
    normalized = bytearray()
    trie: dict = {}  # nested dicts keyed by byte; key None holds the value offset
    for key in sorted(mapping):
        if not key or "\0" in key or "\0" in mapping[key]:
            raise ValueError(f"charsmap keys must be non-empty and NUL-free, got {key!r} -> {mapping[key]!r}")
        node = trie
        for byte in key.encode("utf-8"):
            node = node.setdefault(byte, {})
        node[None] = len(normalized)
        normalized += mapping[key].encode("utf-8") + b"\0"

    units: list[int] = [0] * 256
    used = bytearray(256)  # 1 = slot taken
    used[0] = 1  # the root unit
    used_bases: set[int] = set()

    def free_slot(start: int) -> int:
        """The first free slot at or after `start` (found at C speed); past the end everything is free."""
        slot = used.find(0, start) if start < len(used) else -1
        return len(used) if slot < 0 else slot

    def place(labels: list[int]) -> int:
        """The lowest fresh base whose slots base ^ label are all free (growing the array as needed)."""
        slot = free_slot(1)
        while True:  # try each free slot as the place of the first label
            base = slot ^ labels[0]
            if base not in used_bases and all(base ^ lab >= len(used) or not used[base ^ lab] for lab in labels):
                break
            slot = free_slot(slot + 1)
        top = (base | 0xFF) + 1  # the whole 256-unit block of `base` must exist
        if top > len(units):
            units.extend([0] * (top - len(units)))
            used.extend(bytes(top - len(used)))
        used_bases.add(base)
        for lab in labels:
            used[base ^ lab] = 1
        return base

    queue = deque([(trie, 0)])  # (node, the position of its unit); breadth-first keeps the array compact
    while queue:
        node, pos = queue.popleft()
        children = sorted(k for k in node if k is not None)
        labels = ([0] if None in node else []) + children
        base = place(labels)
        offset = pos ^ base
        if offset >= MAX_OFFSET:
            raise ValueError(f"charsmap trie too large (offset {offset})")
        units[pos] |= offset << 10 | (HAS_LEAF if None in node else 0)
        if None in node:
            units[base] = node[None] | IS_LEAF
        for byte in children:
            units[base ^ byte] = byte  # label; offset and has_leaf are filled when the child is placed
            queue.append((node[byte], base ^ byte))

    trie_blob = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie_blob)) + trie_blob + bytes(normalized)


__all__ = ["build_precompiled_charsmap"]
