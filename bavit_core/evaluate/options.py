"""prune-eval's options: the operating points (thresholds or target sparsities), their
parsing and the checks made before any work."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..detection.pruned import LAYOUTS, TREATMENTS
from ..detection.selection import POLICIES, SELECTORS
from ..runtime.errors import OptionError
from ..runtime.fileio import refuse_output_over_inputs
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


def selectors_for(opts: PruneEvalOptions) -> list[str]:
    allowed = ["dense"]
    if opts.model:
        allowed += ["bavit", "random"]
    if opts.labels:
        allowed.append("oracle")
    if opts.selectors is None:
        return [s for s in SELECTORS if s in allowed]
    for s in opts.selectors:
        if s not in SELECTORS:
            raise OptionError(f"unknown selector {s!r}; choose from {', '.join(SELECTORS)}")
        if s not in allowed:
            need = "--labels" if s == "oracle" else "--model"
            raise OptionError(f"selector {s!r} needs {need}")
    return list(dict.fromkeys(opts.selectors))


def check_options(opts: PruneEvalOptions) -> None:
    """Every option checked before any work (an --out over an input included)."""
    check_option_values(opts.device, {"resample": (opts.resample, ("nearest", "any")),
                                      "layout": (opts.layout, LAYOUTS)},
                        batch_size=(opts.batch_size, 1), max_images=(opts.max_images, 1),
                        timing_images=(opts.timing_images, 0), timing_repeats=(opts.timing_repeats, 1),
                        postprocess_steps=(opts.postprocess_steps, 0))
    refuse_output_over_inputs(opts.out, [opts.root, opts.ann, opts.images, opts.labels, opts.model], is_dir=True)
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
    bad = [t for t in treatments if t not in TREATMENTS]
    if bad or not treatments:
        raise OptionError(f"unknown --pruned-tokens {bad[0] if bad else ''!r}; choose from {', '.join(TREATMENTS)}")
    if opts.treatments_for is not None and not opts.treatments_for:
        raise OptionError("--treatments-for is empty; name selectors (e.g. bavit) or leave it out")
    for s in opts.treatments_for or []:
        if s not in SELECTORS or s == "dense":
            raise OptionError(f"unknown --treatments-for selector {s!r}; choose from "
                              f"{', '.join(x for x in SELECTORS if x != 'dense')}")
    if opts.runtime == "onnx" and treatments != ["drop"]:
        raise OptionError("--runtime onnx evaluates the exported graphs, which drop pruned tokens: "
                          "use --pruned-tokens drop")
