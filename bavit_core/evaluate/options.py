"""prune-eval's options: the operating points (thresholds or target sparsities), their
parsing and the checks made before any work."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..detection.pruned import LAYOUTS
from ..detection.treatments import TREATMENTS, get_treatment
from ..detection.selection import POLICIES
from .selectors import GATE_NEED, PRUNING_SELECTORS, REGISTRY, selectors_available
from ..runtime.errors import OptionError
from ..runtime.fileio import check_output_writable, refuse_output_over_inputs
from ..runtime.options import check_option_values


def _parse_range(text: str, option: str, default_step: float = 0.1) -> list[float]:
    s = str(text).strip()
    try:
        if ":" in s:
            parts = [float(v) for v in s.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            start, stop = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else default_step
            if step <= 0:
                raise OptionError(f"{option} {text!r}: the step must be positive")
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            vals = [round(start + k * step, 10) for k in range(max(n, 0))]
        else:
            vals = [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"cannot read {option} {text!r}: use start:stop[:step] or a,b,c") from None
    if not vals:
        raise OptionError(f"{option} {text!r} is an empty range")
    return sorted(set(vals))


def parse_thresholds(text: str) -> list[float]:
    """``start:stop[:step]`` (inclusive, default step 0.1) or ``a,b,c``; values in [0, 1]."""
    vals = _parse_range(text, "--thresholds")
    bad = [v for v in vals if not 0.0 <= v <= 1.0]
    if bad:
        raise OptionError(f"--thresholds must lie in [0, 1]; got {bad[0]}")
    return vals


def parse_sparsities(text: str) -> list[float]:
    """Target mean sparsities: ``start:stop[:step]`` or ``a,b,c``; values in [0, 1)."""
    vals = _parse_range(text, "--sparsities")
    bad = [v for v in vals if not (0.0 <= v < 1.0)]
    if bad:
        raise OptionError(f"--sparsities must lie in [0, 1); got {bad[0]}")
    return vals


@dataclass
class PruneEvalOptions:
    detector: str
    dataset: str = "coco"
    root: str | None = None
    split: str | None = None
    ann: str | None = None
    images: str | None = None
    model: str | None = None
    labels: str | None = None
    thresholds: list[float] = field(default_factory=lambda: [0.5])
    sparsities: list[float] | None = None  # target mean sparsities (instead of thresholds)
    policy: str = "threshold"  # how a target is reached: threshold (dynamic) or topk (fixed rate)
    selectors: list[str] | None = None
    category_map: str | None = None  # JSON {dataset class name: detector class name}
    batch_size: int = 1
    detector_size: tuple[int, int] | None = None  # None: the detector's configured image_size
    resample: str = "nearest"
    postprocess_steps: int = 0
    layout: str | None = None
    timing_images: int = 8
    timing_repeats: int = 3
    max_images: int | None = None
    dtype: str = "fp32"
    device: str = "auto"
    seed: int = 0
    out: str = "results"
    pruned_tokens: list[str] = field(default_factory=lambda: ["drop"])  # treatments of pruned tokens
    treatments_for: list[str] | None = None  # selectors swept over every treatment; others get the first
    runtime: str = "torch"  # or "onnx": BAViT and the detector run from --exported graphs in ONNX Runtime
    exported: str | None = None
    latency_budget_ms: float | None = None  # add the target whose measured latency (from --speed) meets it
    speed: str | None = None  # a directory from bavit bench
    latency_budget: dict | None = None  # how the budget was resolved (set by apply_latency_budget)
    prune_at_layer: int = 2  # in-detector selectors (attention): dense layers before they choose


def selectors_for(opts: PruneEvalOptions) -> list[str]:
    """The selectors this run makes rows for (the registry's, where their needs are met)."""
    from ..detection.gate import has_gate

    return selectors_available({"--model": bool(opts.model), "--labels": bool(opts.labels),
                                # the exported graphs hold no gate: under --runtime onnx its rows are not made by
                                # default, and asked for they are refused (check_options)
                                GATE_NEED: has_gate(opts.detector) and (opts.runtime != "onnx" or bool(opts.selectors))},
                               opts.selectors)


def apply_latency_budget(opts: PruneEvalOptions) -> dict | None:
    """``--latency-budget MS --speed DIR``: the lowest sparsity whose end-to-end latency
    on bench's curve (this run's runtime, dtype, batch size and first treatment; BAViT
    included when the bench had one) meets the budget joins ``opts.sparsities`` (the only
    target when none were given). Resolved once; returns what was picked (None without a
    budget); an error when no measured sparsity meets it."""
    if opts.latency_budget_ms is None and opts.speed is None:
        return None
    if opts.latency_budget_ms is None or opts.speed is None:
        raise OptionError("--latency-budget and --speed go together (--speed: the directory from bavit bench)")
    if opts.latency_budget is not None:
        return opts.latency_budget
    from .speedcurve import curves, pick_curve, read_speed, sparsity_for_budget

    if opts.postprocess_steps:
        raise OptionError("--latency-budget adds a target sparsity, which --postprocess-steps does not work with")

    c = pick_curve(curves(read_speed(opts.speed)), opts.speed, opts.runtime, opts.dtype, opts.batch_size,
                   opts.pruned_tokens[0] if opts.pruned_tokens else "drop")
    pick = sparsity_for_budget(c, float(opts.latency_budget_ms), opts.speed)
    opts.sparsities = sorted(set(opts.sparsities or []) | {pick.sparsity})
    opts.latency_budget = {"budget_ms": float(opts.latency_budget_ms), "sparsity": pick.sparsity,
                           "curve_latency_ms": pick.latency_ms, "curve": c.label, "device": c.device,
                           "end_to_end": c.has_bavit, "speed": str(opts.speed)}
    return opts.latency_budget


def check_options(opts: PruneEvalOptions) -> None:
    """Every option checked before any work (an --out over an input included); a latency
    budget is resolved last, into a target sparsity."""
    check_option_values(opts.device, {"resample": (opts.resample, ("nearest", "any")),
                                      "layout": (opts.layout, LAYOUTS)},
                        batch_size=(opts.batch_size, 1), max_images=(opts.max_images, 1),
                        timing_images=(opts.timing_images, 0), timing_repeats=(opts.timing_repeats, 1),
                        postprocess_steps=(opts.postprocess_steps, 0))
    refuse_output_over_inputs(opts.out, [opts.root, opts.ann, opts.images, opts.labels, opts.model, opts.speed],
                              is_dir=True)
    check_output_writable(opts.out)
    if opts.dtype not in ("fp32", "bf16", "fp16"):
        raise OptionError("--dtype must be fp32, bf16 or fp16")
    if opts.policy not in POLICIES:
        raise OptionError(f"--policy must be one of {', '.join(POLICIES)}")
    if opts.sparsities is not None:
        if opts.postprocess_steps:
            raise OptionError("--postprocess-steps works with --thresholds only (a target sparsity ranks "
                              "BAViT's probabilities directly)")
        if not opts.sparsities:
            raise OptionError("--sparsities is empty")
    treatments = list(dict.fromkeys(opts.pruned_tokens))
    if not treatments:
        raise OptionError(f"--pruned-tokens is empty; choose one of {', '.join(TREATMENTS)}")
    for t in treatments:
        get_treatment(t)
    if opts.treatments_for is not None and not opts.treatments_for:
        raise OptionError("--treatments-for is empty; name selectors (e.g. bavit) or leave it out")
    for s in opts.treatments_for or []:
        if s not in PRUNING_SELECTORS:
            raise OptionError(f"unknown --treatments-for selector {s!r}; choose one of {', '.join(PRUNING_SELECTORS)}")
    if opts.prune_at_layer < 0:
        raise OptionError(f"--prune-at-layer must be at least 0; got {opts.prune_at_layer}")
    in_detector = [n for n in (opts.selectors or []) if n in REGISTRY and REGISTRY[n].in_detector]
    no_thresholds = [n for n in in_detector if REGISTRY[n].at_thresholds is None]
    if no_thresholds and opts.sparsities is None:
        raise OptionError(f"the {no_thresholds[0]} selector keeps a top share of the detector's tokens: give "
                          "--sparsities (it has no BG-probability thresholds)")
    if in_detector and opts.runtime == "onnx":
        raise OptionError(f"the {in_detector[0]} selector runs in PyTorch only: leave --runtime at torch")
    if opts.runtime == "onnx" and treatments != ["drop"]:
        raise OptionError("--runtime onnx evaluates the exported graphs, which drop pruned tokens: "
                          "use --pruned-tokens drop")
    apply_latency_budget(opts)
