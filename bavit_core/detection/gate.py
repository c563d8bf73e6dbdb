"""The in-detector token gate (SViT-style): a 2-layer MLP on the patch tokens' states after
layer k of the detector scores keep/drop; the remaining layers run on the kept tokens.

A gate is saved beside the detector it was trained for (``bavit finetune --train-gate``):
``gate.safetensors`` (its weights) and ``gate.json`` (the layer it reads, its sizes, the
target it was trained to and how). ``prune-eval --detector DIR --selectors gate`` finds it
there. Its decision at inference is hard: a token is kept when its keep probability
σ(z) > 0.5 (``prune-eval``'s thresholds read the drop probability 1 − σ(z) as BAViT's BG
probability: pruned when it is at least the threshold), or each image keeps its top share
at a target sparsity (topk).

Training needs a decision the loss can reach: :func:`relaxed_keep` gives a keep mask
whose forward values are the hard 0/1 decisions and whose gradient is that of a soft
one (straight-through), optionally with logistic (binary Gumbel) noise on the logits.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.errors import InputFileError

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate.json"
RELAXATIONS = ("ste", "gumbel")


class TokenGate(nn.Module):
    """LayerNorm → Linear(d, hidden) → GELU → Linear(hidden, 1): a keep logit per token."""

    def __init__(self, hidden_size: int, hidden: int, layer: int, init_keep: float = 0.5):
        super().__init__()
        self.layer, self.hidden = int(layer), int(hidden)
        self.norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        with torch.no_grad():  # start near the kept share it is trained toward
            self.fc2.weight.mul_(0.1)
            p = min(max(init_keep, 1e-3), 1 - 1e-3)
            self.fc2.bias.fill_(math.log(p / (1 - p)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Keep logits (…,) of patch-token states h (…, d)."""
        return self.fc2(F.gelu(self.fc1(self.norm(h)))).squeeze(-1)

    def macs_per_token(self) -> int:
        d = self.fc1.in_features
        return d * self.hidden + self.hidden


def default_hidden(hidden_size: int) -> int:
    return max(16, hidden_size // 4)


def relaxed_keep(z: torch.Tensor, mode: str = "ste", tau: float = 1.0, training: bool = True) -> torch.Tensor:
    """A keep mask from keep logits ``z``: forward values exactly the hard decisions
    (z > 0; with ``gumbel`` in training, z + logistic noise > 0), gradient that of
    σ((z [+ noise]) / tau) (straight-through). Outside training, the hard decisions."""
    if mode not in RELAXATIONS:
        raise ValueError(f"relaxation must be one of {RELAXATIONS}")
    if not training:
        return (z > 0).to(z.dtype)
    if mode == "gumbel":
        u = torch.rand_like(z).clamp_(1e-6, 1 - 1e-6)
        z = z + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid(z / tau)
    return _StraightThrough.apply(soft, (z > 0).to(z.dtype))


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard values, exactly (``hard + soft − soft.detach()`` is off by a
    rounding); backward: the gradient goes to ``soft`` unchanged."""

    @staticmethod
    def forward(ctx, soft, hard):
        return hard.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def ratio_loss(keep: torch.Tensor, target_sparsity: float) -> torch.Tensor:
    """(mean kept share − (1 − target))² over every patch token of the batch (images keep
    different shares: the mean is held, not each image's)."""
    return (keep.float().mean() - (1.0 - target_sparsity)) ** 2


def save_gate(gate: TokenGate, dest: Path, info: dict) -> None:
    """``gate.safetensors`` and ``gate.json`` into ``dest`` (each written atomically)."""
    from safetensors.torch import save_file

    from ..runtime.fileio import atomic_path, atomic_write_text

    dest.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in gate.state_dict().items()}
    with atomic_path(dest / GATE_WEIGHTS) as tmp:
        save_file(sd, str(tmp))
    doc = {"layer": gate.layer, "hidden": gate.hidden, "hidden_size": gate.fc1.in_features, **info}
    atomic_write_text(dest / GATE_CONFIG, json.dumps(doc, indent=2))


def has_gate(detector: str | Path | None) -> bool:
    return detector is not None and (Path(detector) / GATE_CONFIG).is_file()


def gate_info(detector: str | Path) -> dict:
    p = Path(detector) / GATE_CONFIG
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InputFileError(p, f"unreadable gate config ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise InputFileError(p, "unreadable gate config: not a JSON object")
    for k in ("layer", "hidden", "hidden_size"):
        if not isinstance(doc.get(k), int) or isinstance(doc.get(k), bool) or doc[k] < (0 if k == "layer" else 1):
            raise InputFileError(p, f"unreadable gate config: {k!r} must be a non-negative integer")
    return doc


def load_gate(detector: str | Path, det_config=None, device="cpu") -> TokenGate:
    """The gate saved beside ``detector`` (a directory), checked against the detector's
    config when given (its width, its layer count)."""
    from safetensors.torch import load_file

    d = Path(detector)
    doc = gate_info(d)
    cfg_path = d / GATE_CONFIG
    if det_config is not None:
        if doc["hidden_size"] != det_config.hidden_size:
            raise InputFileError(cfg_path, f"the gate reads {doc['hidden_size']}-wide tokens, the detector's are "
                                           f"{det_config.hidden_size}")
        if doc["layer"] >= det_config.num_hidden_layers:
            raise InputFileError(cfg_path, f"the gate reads layer {doc['layer']}, the detector has "
                                           f"{det_config.num_hidden_layers} (layers 0 to {det_config.num_hidden_layers - 1})")
    gate = TokenGate(doc["hidden_size"], doc["hidden"], doc["layer"])
    w = d / GATE_WEIGHTS
    if not w.is_file():
        raise InputFileError(w, "gate weights not found")
    try:
        sd = load_file(str(w))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for damaged files
        raise InputFileError(w, f"unreadable gate weights ({type(exc).__name__})") from None
    try:
        gate.load_state_dict(sd)
    except RuntimeError:
        raise InputFileError(w, "gate weights do not match gate.json (names or shapes differ)") from None
    return gate.to(device).eval()
