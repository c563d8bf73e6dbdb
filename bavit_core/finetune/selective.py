"""Training what selects the tokens, on the engine: the detector's own token gate
(``finetune --train-gate``) and BAViT trained together with the detector (``--joint``).

Both train through :func:`~bavit_core.detection.masked.masked_forward`, whose keep mask
is a straight-through (optionally Gumbel) relaxation of the hard decisions
(:func:`~bavit_core.detection.gate.relaxed_keep`): the forward is exactly the pruned
detector at those decisions, the detection loss reaches the scores behind them.

* gate: the detector is frozen (eval mode, no gradients); a 2-layer MLP on the patch
  tokens after layer k learns keep/drop from the DETR set loss plus a keep-ratio loss
  toward ``1 − target``. Saved beside the detector (``gate.safetensors``, ``gate.json``).
* joint: BAViT's FG decision at ``--threshold`` (a token is kept when 1 − p_fg < t) keeps
  detector tokens (nearest resampling to the detector grid); loss = set loss +
  ``token_loss_weight`` · BAViT's token loss (eq. 3, on ``--labels``) + ``ratio_weight`` ·
  the keep-ratio loss. Both models' weights are trained; the run directory holds the
  detector (as every finetune run) and the BAViT run in ``bavit/``.

The keep-ratio loss holds the batch's mean kept share, so images keep different shares.
Under several processes each process holds its own batch's mean (the set loss alone is
normalised globally).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..bavit.model import save_weights
from ..bavit.runfiles import CONFIG_FILE, LAST_FILE, MODEL_FILE
from ..data.grid import nearest_index
from ..data.images import to_input
from ..detection.gate import TokenGate, default_hidden, ratio_loss, relaxed_keep, save_gate
from ..detection.layered import layered_forward
from ..detection.masked import masked_forward
from ..detection.pruned import pruned_forward
from ..runtime.distributed import Dist
from ..runtime.fileio import atomic_write_text
from .validation import evaluate_map

BAVIT_DIR = "bavit"  # a joint run's BAViT run, inside the detector run


class GatedDetector(nn.Module):
    """A frozen detector and the gate being trained for it (one state for the engine)."""

    def __init__(self, detector, gate: TokenGate):
        super().__init__()
        self.detector, self.gate = detector, gate
        for q in detector.parameters():
            q.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.detector.eval()  # frozen: no dropout either
        return self


class JointPair(nn.Module):
    """BAViT and the detector, trained together (one state for the engine)."""

    def __init__(self, detector, bavit):
        super().__init__()
        self.detector, self.bavit = detector, bavit


def new_gate(detector, opts, device) -> TokenGate:
    torch.manual_seed(opts.seed)
    c = detector.config.hidden_size
    return TokenGate(c, opts.gate_hidden or default_hidden(c), opts.prune_at_layer,
                     init_keep=1.0 - opts.target_sparsity).to(device)


def keep_logit_threshold(threshold: float) -> float:
    """BAViT keeps a token when 1 − p_fg < t, i.e. when its FG logit margin
    l_fg − l_bg > log((1 − t) / t): this offset (±inf at t = 0 or 1)."""
    if threshold <= 0:
        return math.inf
    if threshold >= 1:
        return -math.inf
    return math.log((1 - threshold) / threshold)


def to_detector_grid(m: torch.Tensor, src: tuple, dst: tuple) -> torch.Tensor:
    """(B, sh·sw) per-token values → (B, dh·dw) on the detector grid, each detector cell
    taking the BAViT cell that holds its centre (``resample_grid``'s nearest)."""
    ri = torch.as_tensor(nearest_index(src[0], dst[0]), device=m.device)
    ci = torch.as_tensor(nearest_index(src[1], dst[1]), device=m.device)
    return m.view(-1, src[0], src[1])[:, ri[:, None], ci[None, :]].reshape(m.shape[0], -1)


class _SelectiveTrainer:
    """What the gate and joint trainers share: the loss parts' bookkeeping and validation."""

    def _loss(self, out, targets, dist, extra, n):
        from .loop import set_loss

        loss, parts = set_loss(self.det, out.logits.float(), out.pred_boxes.float(), targets, self.device, dist)
        ratio = ratio_loss(out.keep, self.opts.target_sparsity)
        total = loss + self.opts.ratio_weight * ratio + extra
        kept = float(out.keep.detach().float().mean())
        item = lambda v: float(v.detach()) if torch.is_tensor(v) else float(v)  # noqa: E731
        return total, [item(total) * n, item(parts["loss_ce"]) * n, item(parts["loss_bbox"]) * n,
                       item(parts["loss_giou"]) * n, item(ratio) * n, kept * n, item(extra) * n, n]

    def train_row(self, tot):
        n = tot[7]
        row = {"train_loss": tot[0] / n, "train_loss_ce": tot[1] / n, "train_loss_bbox": tot[2] / n,
               "train_loss_giou": tot[3] / n, "train_loss_ratio": tot[4] / n, "train_sparsity": 1 - tot[5] / n}
        if self.extra_name:
            row[self.extra_name] = tot[6] / n
        return row

    def score(self, row):
        return row.get("val_map", -row["train_loss"])

    def validate(self, dist: Dist):
        if self.val is None:
            return {}
        m = evaluate_map(self.model, self.val, self.gt, self.opts.batch_size, self.device, dist, forward=self._infer)
        return {f"val_{k}": v for k, v in m.items()}


class GateTrainer(_SelectiveTrainer):
    """The gate on the engine, the detector frozen."""

    extra_name = None

    def __init__(self, model: GatedDetector, train, val, gt, opts, device):
        self.model, self.det, self.gate = model, model.detector, model.gate
        self.train, self.val, self.gt, self.opts, self.device = train, val, gt, opts, device
        self.params = list(self.gate.parameters())
        self.optim = torch.optim.AdamW(self.params, lr=opts.lr, weight_decay=opts.weight_decay)
        self.n_train = len(train.ids)

    def step(self, idx, flips, dist):
        from .data import make_batch

        x, _, targets = make_batch(self.train, idx, flips, self.device)
        o = self.opts
        out = masked_forward(self.det, x, layer=self.gate.layer,
                             scorer=lambda hp: relaxed_keep(self.gate(hp), o.relaxation, o.temperature, True))
        return self._loss(out, targets, dist, 0.0, len(idx))

    def _infer(self, x, _b):
        r = layered_forward(self.det, x, self.gate.layer, gate=self.gate, threshold=0.5)
        return r.logits, r.pred_boxes, torch.stack(r.keep)


class JointTrainer(_SelectiveTrainer):
    """BAViT and the detector on the engine, trained together."""

    extra_name = "train_loss_token"

    def __init__(self, model: JointPair, train, val, gt, grid, opts, device):
        self.model, self.det, self.bavit = model, model.detector, model.bavit
        self.train, self.val, self.gt, self.grid, self.opts, self.device = train, val, gt, tuple(grid), opts, device
        self.params = [q for q in model.parameters() if q.requires_grad]
        self.optim = torch.optim.AdamW(self.params, lr=opts.lr, weight_decay=opts.weight_decay)
        self.n_train = len(train.ids)
        self.offset = keep_logit_threshold(opts.threshold)
        self.bgrid = tuple(self.bavit.cfg.grid_shape)

    def _bavit_input(self, data, b, flips=None):
        cfg = self.bavit.cfg
        xb = to_input(data.bavit_images[b], cfg.mean, cfg.std, self.device)
        y = None if data.token_labels is None else torch.as_tensor(data.token_labels[b], device=self.device)
        if flips is not None:
            f = torch.as_tensor(flips[b], device=self.device)
            if f.any():
                xb[f] = xb[f].flip(-1)
                if y is not None:
                    y[f] = y[f].flip(-1)
        return xb, y

    def step(self, idx, flips, dist):
        from ..bavit.train import acc_loss
        from .data import make_batch

        x, _, targets = make_batch(self.train, idx, flips, self.device)
        xb, y = self._bavit_input(self.train, idx, flips)
        logits_b = self.bavit(xb).float()  # (B, Pb, 2)
        z = logits_b[..., 1] - logits_b[..., 0] - self.offset
        keep = to_detector_grid(relaxed_keep(z, self.opts.relaxation, self.opts.temperature, True), self.bgrid, self.grid)
        out = masked_forward(self.det, x, keep, layer=0)
        tok = acc_loss(logits_b, y, 1.0) if (y is not None and self.opts.token_loss_weight > 0) else None
        extra = 0.0 if tok is None else self.opts.token_loss_weight * tok
        return self._loss(out, targets, dist, extra, len(idx))

    def _infer(self, x, b):
        xb, _ = self._bavit_input(self.val, b)
        probs = self.bavit.fg_prob(xb).reshape(len(b), -1)
        keep = to_detector_grid(((1.0 - probs) < self.opts.threshold).float(), self.bgrid, self.grid).bool()
        r = pruned_forward(self.det, x, keep)
        return r.logits, r.pred_boxes, keep


def save_selective(model, out: Path, opts, rows, epoch: int, selected: bool) -> None:
    """The gate (beside the detector) or the joint BAViT run (``out/bavit``) of ``epoch``:
    the selected one in the run directory, the last in ``last/`` (gate) or
    ``last.safetensors`` (BAViT)."""
    if isinstance(model, GatedDetector):
        info = {"target_sparsity": opts.target_sparsity, "relaxation": opts.relaxation, "epochs_trained": epoch + 1,
                "trained_by": "bavit finetune --train-gate", "detector": str(opts.detector)}
        if selected:
            save_gate(model.gate, out, info)
        save_gate(model.gate, out / "last", info)
        return
    bdir = out / BAVIT_DIR
    bdir.mkdir(parents=True, exist_ok=True)
    if selected:
        save_weights(model.bavit, bdir / MODEL_FILE, {"epoch": epoch, "joint": True})
    save_weights(model.bavit, bdir / LAST_FILE, {"epoch": epoch, "joint": True})
    src = json.loads((Path(opts.model) / CONFIG_FILE).read_text())
    src["joint"] = {"detector": str(out.resolve()), "source_run": str(Path(opts.model).resolve()),
                    "target_sparsity": opts.target_sparsity, "threshold": opts.threshold,
                    "relaxation": opts.relaxation, "token_loss_weight": opts.token_loss_weight,
                    "ratio_weight": opts.ratio_weight, "epochs": opts.epochs, "select": opts.select,
                    "trained_by": "bavit finetune --joint"}
    src["init"] = f"jointly fine-tuned with the detector in {out} (from the BAViT run {opts.model})"
    atomic_write_text(bdir / CONFIG_FILE, json.dumps(src, indent=2, default=str))
