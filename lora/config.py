"""`LoRAConfig`: which Linear layers get an adapter, and the adapter's rank, scale, dropout and init."""
from __future__ import annotations

import re
from dataclasses import dataclass

from core.cli import COUNT, POSITIVE, flag

from .layer import check_init

# Every Linear inside a GPT-NeoX block: attention in/out projections and the two MLP projections.
# As suffixes, "dense" matches `attention.dense` only (a name must end with ".dense"), not `mlp.dense_h_to_4h`.
GPT_NEOX_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


@dataclass
class LoRAConfig:
    """What `inject_lora` does. Field names map to PEFT's adapter_config.json as
    r→r, alpha→lora_alpha, dropout→lora_dropout, target_modules→target_modules, use_rslora→use_rslora,
    init→init_lora_weights. The fields carry their command-line flags (`--lora-r`, ...: core.cli), so a command
    offering LoRA settings adds them with `add_config_flags(parser, LoRAConfig, prefix="lora_")`.

    target_modules: a list of names matched as suffixes (a module is wrapped if its full name equals a
    target or ends with "." + target), or one string used as a regular expression that must match the whole
    module name (`re.fullmatch`), exactly as PEFT matches them.
    """
    r: int = flag(16, flag="--lora-r", range=COUNT, help="LoRA rank r")
    alpha: float = flag(32, flag="--lora-alpha", range=POSITIVE, help="LoRA alpha: the update is scaled by α/r")
    dropout: float = flag(0.05, flag="--lora-dropout", range="[0, 1)", help="dropout on the LoRA input")
    target_modules: list[str] | str = flag(list(GPT_NEOX_TARGETS), flag="--lora-targets", dest="lora_targets",
                                           help="Linear names (suffixes) that get an adapter")
    use_rslora: bool = False
    # True: Kaiming-uniform A ("kaiming" on the command line); "gaussian": Normal(0, 1/r) A; False: A and B random
    init: bool | str = flag(True, flag="--lora-init", choices=("kaiming", "gaussian"),
                            help="init of lora_A: kaiming (PEFT's default, ours) or gaussian (the original's); "
                                 "default kaiming")

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, (tuple, set, frozenset)):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, (set, frozenset)) \
                else list(self.target_modules)
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"LoRAConfig.target_modules: {self.target_modules!r} is not a valid regex "
                                 f"({e})") from None
            if not self.target_modules:
                raise ValueError("LoRAConfig.target_modules: the regex is empty")
        elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"LoRAConfig.target_modules must be a non-empty list of names or a regex string, "
                             f"got {self.target_modules!r}")
        self.init = check_init(self.init)

    @property
    def scaling(self) -> float:
        """The factor s in y = W·x + s·B·A·x: α/r, or α/√r with rsLoRA."""
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    @classmethod
    def original_ohlora(cls) -> "LoRAConfig":
        """The configuration the original Oh-LoRA adapter was trained with (PEFT, Polyglot-Ko 1.3B):
        r=128, α=16 (so s = 0.125), dropout 0.05, Gaussian init, attention `query_key_value` only."""
        return cls(r=128, alpha=16, dropout=0.05, target_modules=["query_key_value"], init="gaussian")
