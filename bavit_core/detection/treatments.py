"""The registry of treatments: what the pruned forward does with the patch tokens it does
not compute (``--pruned-tokens``). Each entry says how it is counted (eq. 4 tokens,
FLOPs) and whether ONNX export has it; the forward itself lives in :mod:`.pruned`. Adding
a treatment starts here: every command's option check, help text and accounting reads
this table. No torch here (option checks and `bavit --help` must not load it)."""
from __future__ import annotations

from dataclasses import dataclass

from ..runtime.errors import OptionError


@dataclass(frozen=True)
class Treatment:
    name: str
    summary: str
    #: one token per layer that summarises the pruned ones (computed whenever anything is pruned)
    summary_token: bool = False
    #: the pruned tokens stay as keys/values every layer attends to (embedded, never updated)
    keys_values: bool = False
    #: bavit export can write graphs with it
    exportable: bool = False


REGISTRY: dict[str, Treatment] = {t.name: t for t in (
    Treatment("drop", "never computed (the paper)", exportable=True),
    Treatment("pool", "one mean token stands for them", summary_token=True),
    Treatment("preserve", "frozen keys/values every layer attends to (SViT)", keys_values=True),
)}
TREATMENTS: tuple[str, ...] = tuple(REGISTRY)
EXPORTED_TREATMENTS: tuple[str, ...] = tuple(n for n, t in REGISTRY.items() if t.exportable)


def get_treatment(name: str, option: str = "--pruned-tokens") -> Treatment:
    """The registered treatment ``name``; an unknown one is an OptionError naming ``option``."""
    if name not in REGISTRY:
        raise OptionError(f"unknown {option} {name!r}; choose one of {', '.join(TREATMENTS)}")
    return REGISTRY[name]


def treatments_help() -> str:
    return "; ".join(f"{t.name}: {t.summary}" for t in REGISTRY.values())
