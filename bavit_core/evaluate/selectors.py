"""The registry of selectors: who decides which patch tokens a row of prune-eval computes.

Each entry names what it needs (a BAViT run, the labels) and builds its rows, at the
sweep's BG-probability thresholds or at its target sparsities, from a :class:`RowInputs`
(the images' count and detector grids, BAViT's selection at each operating point, the
oracle's priorities). Option checks, the default selector list and the rows all read this
table, so a new selector (an in-detector one, say) is one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..detection.selection import dense_keep, random_keep, select_target
from ..runtime.errors import OptionError

NAN = float("nan")


@dataclass
class RowInputs:
    """What selectors build rows from. ``bavit_at_threshold[t]`` is BAViT's kept tokens at
    threshold ``t``; ``bavit_at_target[s]`` is (kept tokens, the threshold reached) at target
    sparsity ``s`` under ``policy``; ``oracle`` the labels' FG priorities (None without labels)."""

    n: int
    grid: object
    seed: int
    policy: str = "threshold"
    bavit_at_threshold: dict | None = None
    bavit_at_target: dict | None = None
    oracle: object = None


# a row as the sweep makes it: (selector, threshold, keep, policy, target)
RowSpec = tuple


@dataclass(frozen=True)
class Selector:
    name: str
    summary: str
    needs: str | None = None  # what it needs: "--model", "--labels" or GATE_NEED
    at_thresholds: Callable[[RowInputs, list[float]], list[RowSpec]] | None = None
    at_targets: Callable[[RowInputs, list[float]], list[RowSpec]] | None = None
    prunes: bool = True  # False: its row computes every token (one row, whatever the treatments)
    default: bool = True  # False: only when --selectors names it
    #: it chooses inside the detector, after --prune-at-layer layers: its rows' kept tokens come from
    #: the detector's forward (keep None in its RowSpecs), which the sweep runs per image
    in_detector: bool = False


def _dense(x: RowInputs, _points) -> list[RowSpec]:
    return [("dense", NAN, dense_keep(x.n, x.grid), "threshold", NAN)]


def _bavit_thr(x: RowInputs, ts) -> list[RowSpec]:
    return [("bavit", t, x.bavit_at_threshold[t], "threshold", NAN) for t in ts]


def _bavit_tgt(x: RowInputs, ss) -> list[RowSpec]:
    return [("bavit", x.bavit_at_target[s][1], x.bavit_at_target[s][0], x.policy, s) for s in ss]


def _oracle_thr(x: RowInputs, _ts) -> list[RowSpec]:
    return [("oracle", NAN, x.oracle, "threshold", NAN)]  # the labels' own FG tokens: one row


def _oracle_tgt(x: RowInputs, ss) -> list[RowSpec]:
    return [("oracle", NAN, select_target(x.oracle, s, x.policy, seed=[x.seed, 2])[0], x.policy, s) for s in ss]


def _random_thr(x: RowInputs, ts) -> list[RowSpec]:  # BAViT's kept counts, random positions
    return [("random", t, random_keep(x.bavit_at_threshold[t], [x.seed, int(round(t * 1e6))]), "threshold", NAN)
            for t in ts]


def _random_tgt(x: RowInputs, ss) -> list[RowSpec]:
    return [("random", NAN, random_keep(x.bavit_at_target[s][0], [x.seed, int(round(s * 1e6))]), x.policy, s)
            for s in ss]


def _attention_tgt(x: RowInputs, ss) -> list[RowSpec]:  # always topk: every image keeps its top share
    return [("attention", NAN, None, "topk", s) for s in ss]


def _gate_thr(x: RowInputs, ts) -> list[RowSpec]:  # pruned where the gate's drop probability >= t
    return [("gate", t, None, "threshold", NAN) for t in ts]


def _gate_tgt(x: RowInputs, ss) -> list[RowSpec]:  # topk by the gate's keep probability
    return [("gate", NAN, None, "topk", s) for s in ss]


GATE_NEED = "a gate beside --detector (bavit finetune --train-gate)"


REGISTRY: dict[str, Selector] = {s.name: s for s in (
    Selector("dense", "every token (the unpruned detector)", None, _dense, _dense, prunes=False),
    Selector("bavit", "BAViT's FG tokens (the paper)", "--model", _bavit_thr, _bavit_tgt),
    Selector("oracle", "the ground-truth FG tokens of the labels", "--labels", _oracle_thr, _oracle_tgt),
    Selector("random", "as many tokens as BAViT keeps, at random positions", "--model", _random_thr, _random_tgt),
    Selector("attention", "the detector's own layer-k attention from CLS and detection tokens (EViT-style; "
             "--sparsities, topk)", None, None, _attention_tgt, default=False, in_detector=True),
    Selector("gate", "the detector's trained token gate after its layer (SViT-style; at thresholds its drop "
             "probability, at --sparsities topk)", GATE_NEED, _gate_thr, _gate_tgt, in_detector=True),
)}
SELECTORS: tuple[str, ...] = tuple(REGISTRY)
PRUNING_SELECTORS: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if s.prunes)


def selectors_available(has: dict[str, bool], asked: list[str] | None) -> list[str]:
    """The selectors a run makes rows for: ``asked`` (checked), or every one whose needs
    (``has["--model"]``, ``has["--labels"]``, ``has[GATE_NEED]``) are met, in registry order (those not on by
    default only when asked)."""
    ok = [n for n, s in REGISTRY.items() if s.needs is None or has.get(s.needs)]
    if asked is None:
        return [n for n in ok if REGISTRY[n].default]
    for name in asked:
        if name not in REGISTRY:
            raise OptionError(f"unknown selector {name!r}; choose one of {', '.join(SELECTORS)}")
        if name not in ok:
            raise OptionError(f"selector {name!r} needs {REGISTRY[name].needs}")
    return list(dict.fromkeys(asked))


def build_rows(selectors: list[str], x: RowInputs, thresholds: list[float] | None,
               targets: list[float] | None) -> list[RowSpec]:
    """Every selector's rows, at the thresholds (when ``targets`` is None) or the targets."""
    rows: list[RowSpec] = []
    for name in selectors:
        s = REGISTRY[name]
        rows += s.at_thresholds(x, thresholds) if targets is None else s.at_targets(x, targets)
    return rows
