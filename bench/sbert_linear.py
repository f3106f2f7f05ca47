"""Why sbert's CPU inference uses oneDNN packed linears: eager `F.linear` (MKL) vs `core.onednn.PackedLinear`.

    flock /tmp/ohlora-heavy.lock python -m bench.sbert_linear [--repeats 5]

For each GEMM shape of an all-MiniLM-L6-v2 layer (rows = 32 sentences x 40 tokens), in one process and
interleaved: best-of-N milliseconds of `F.linear(x, W, b)` [+ GELU / + residual] and of the packed oneDNN
kernel with the same epilogue fused, their ratio, and the largest difference of the outputs. The end-to-end
figure (our `encode` vs sentence-transformers') is in `python -m bench.sbert`.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from core.onednn import PackedLinear, packing_available

ROWS, HIDDEN, INTER = 32 * 40, 384, 1536
CASES = [("qkv  384->1152", HIDDEN, 3 * HIDDEN, ""), ("out  384->384 +res", HIDDEN, HIDDEN, "res"),
         ("ffn1 384->1536 +gelu", HIDDEN, INTER, "gelu"), ("ffn2 1536->384 +res", INTER, HIDDEN, "res")]


def best_ms(fn, repeats: int, inner: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sbert_linear", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not packing_available():
        print("oneDNN packed linear ops are not available in this torch build: nothing to compare")
        return 0
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, rows {ROWS}")
    print(f"{'GEMM':24s} {'F.linear ms':>12s} {'oneDNN ms':>10s} {'ratio':>7s} {'max |diff|':>11s}")
    for name, d_in, d_out, epilogue in CASES:
        lin = nn.Linear(d_in, d_out)
        packed = PackedLinear(lin)
        x, res = torch.randn(ROWS, d_in), torch.randn(ROWS, d_out)
        with torch.inference_mode():
            if epilogue == "gelu":
                plain, fast = (lambda: F.gelu(F.linear(x, lin.weight, lin.bias))), (lambda: packed(x, act="gelu"))
            elif epilogue == "res":
                plain, fast = (lambda: F.linear(x, lin.weight, lin.bias) + res), (lambda: packed(x, residual=res))
            else:
                plain, fast = (lambda: F.linear(x, lin.weight, lin.bias)), (lambda: packed(x))
            t_plain, t_fast = float("inf"), float("inf")
            for _ in range(2):  # interleave so both see the same machine load
                t_plain = min(t_plain, best_ms(plain, args.repeats))
                t_fast = min(t_fast, best_ms(fast, args.repeats))
            diff = (plain() - fast()).abs().max().item()
            print(f"{name:24s} {t_plain:12.2f} {t_fast:10.2f} {t_plain / t_fast:6.2f}x {diff:11.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
