"""Options of ``bavit finetune`` and their validation."""
from __future__ import annotations

from dataclasses import dataclass

from ..detection.treatments import get_treatment
from ..runtime.errors import OptionError

SELECTORS = ("none", "oracle", "bavit")


@dataclass
class FinetuneOptions:
    dataset: str = "coco"
    root: str | None = None
    split: str | None = None
    ann: str | None = None
    images: str | None = None
    val_split: str | None = None
    val_labels: str | None = None
    val_fraction: float = 0.1
    detector: str | None = None
    from_scratch: bool = False
    detector_config: str = "micro"
    num_detection_tokens: int | None = None
    init_encoder: str | None = None  # with from_scratch: a BAViT run whose layers start the encoder
    dense_aux: float = 0.0  # weight of the per-token auxiliary loss (dense_aux.py); 0 = off
    detector_size: tuple | None = None  # None: square_protocol's default (the init detector's own, else 512)
    selector: str = "none"
    labels: str | None = None
    model: str | None = None
    threshold: float = 0.5
    resample: str = "nearest"
    pruned_tokens: str = "drop"  # treatment of pruned tokens in training and validation (detection/pruned.py)
    epochs: int | None = 30  # None on resume: keep the run's own
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    step_size: int = 20
    gamma: float = 0.1
    clip_grad: float = 0.1
    flip: bool = True
    seed: int = 0
    amp: bool = True
    device: str = "auto"
    max_images: int | None = None
    select: str = "last"
    out: str = "detectors/yolos-F"
    # training what selects the tokens (finetune/selective.py)
    train_gate: bool = False  # the detector frozen, a token gate after layer prune_at_layer trained
    joint: bool = False  # BAViT (--model) and the detector trained together
    target_sparsity: float | None = None  # the kept share the keep-ratio loss holds: 1 - this
    prune_at_layer: int = 2  # the gate's layer (dense layers before it decides)
    gate_hidden: int | None = None  # the gate MLP's width [default: max(16, hidden / 4)]
    relaxation: str = "ste"  # ste (straight-through) or gumbel (with logistic noise)
    temperature: float = 1.0  # the relaxation's temperature
    ratio_weight: float = 100.0  # weight of the keep-ratio loss
    token_loss_weight: float = 1.0  # joint: weight of BAViT's token loss (eq. 3, on --labels)

    @property
    def trains_selection(self) -> bool:
        return self.train_gate or self.joint

    def validate(self):
        self._validate_selective()
        if self.selector not in SELECTORS:
            raise OptionError(f"unknown --selector {self.selector!r}; choose one of {', '.join(SELECTORS)}")
        if self.selector == "oracle" and not self.labels:
            raise OptionError("--selector oracle needs --labels PARQUET")
        if self.selector == "bavit" and not self.model:
            raise OptionError("--selector bavit needs --model RUN")
        if not self.from_scratch and not self.detector:
            raise OptionError("give --detector NAME|DIR to fine-tune, or --from-scratch --detector-config NAME")
        if self.from_scratch and self.detector:
            raise OptionError("--from-scratch builds a new detector: drop --detector")
        if self.init_encoder and not self.from_scratch:
            raise OptionError("--init-encoder starts a new detector's encoder: it needs --from-scratch")
        if self.dense_aux < 0:
            raise OptionError(f"--dense-aux must be >= 0, got {self.dense_aux}")
        if self.epochs is None or self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise OptionError("--epochs, --batch-size and --lr must be positive")
        if self.schedule not in ("cosine", "step"):
            raise OptionError("--schedule must be cosine or step")
        get_treatment(self.pruned_tokens)
        if not 0.0 <= self.threshold <= 1.0:
            raise OptionError(f"--threshold must be in [0, 1], got {self.threshold}")
        self._validate_ranges()

    def _validate_selective(self) -> None:
        """--train-gate and --joint (finetune/selective.py)."""
        import math

        from ..detection.gate import RELAXATIONS

        if not self.trains_selection:
            if self.target_sparsity is not None:
                raise OptionError("--target-sparsity is the kept share --train-gate or --joint trains toward: "
                                  "add one of them (sparse fine-tuning takes BAViT's --threshold)")
            return
        flag = "--train-gate" if self.train_gate else "--joint"
        if self.train_gate and self.joint:
            raise OptionError("--train-gate trains a gate for a frozen detector, --joint trains BAViT with the "
                              "detector: choose one")
        if self.target_sparsity is None or not 0.0 < self.target_sparsity < 1.0:
            raise OptionError(f"{flag} needs --target-sparsity S with 0 < S < 1"
                              + ("" if self.target_sparsity is None else f", got {self.target_sparsity}"))
        if self.from_scratch or not self.detector:
            raise OptionError(f"{flag} trains with a trained detector: give --detector NAME|DIR (not --from-scratch)")
        if self.dense_aux:
            raise OptionError(f"--dense-aux does not go with {flag} (its per-token loss reads the dropped tokens)")
        if self.pruned_tokens != "drop":
            raise OptionError(f"{flag} trains with pruned tokens dropped: leave --pruned-tokens at drop "
                              "(prune-eval evaluates the result under every treatment)")
        if self.relaxation not in RELAXATIONS:
            raise OptionError(f"unknown --relaxation {self.relaxation!r}; choose {' or '.join(RELAXATIONS)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise OptionError(f"--temperature must be positive, got {self.temperature}")
        if not (self.ratio_weight >= 0 and math.isfinite(self.ratio_weight)):
            raise OptionError(f"--ratio-weight must be >= 0, got {self.ratio_weight}")
        if self.train_gate:
            if self.selector != "none":
                raise OptionError("--train-gate: the gate chooses the tokens; drop --selector")
            if self.prune_at_layer < 0:
                raise OptionError(f"--prune-at-layer must be at least 0, got {self.prune_at_layer}")
            if self.gate_hidden is not None and self.gate_hidden < 1:
                raise OptionError(f"--gate-hidden must be at least 1, got {self.gate_hidden}")
            return
        if not self.model:
            raise OptionError("--joint trains a BAViT run with the detector: give --model RUN")
        if self.selector == "oracle":
            raise OptionError("--joint: BAViT chooses the tokens; drop --selector oracle")
        self.selector = "bavit"
        if self.resample != "nearest":
            raise OptionError("--joint brings BAViT's decisions to the detector grid by nearest cells: leave "
                              "--resample at nearest")
        if not (self.token_loss_weight >= 0 and math.isfinite(self.token_loss_weight)):
            raise OptionError(f"--token-loss-weight must be >= 0, got {self.token_loss_weight}")
        if self.token_loss_weight > 0 and not self.labels:
            raise OptionError("--joint keeps BAViT's token loss (eq. 3): give --labels PARQUET of the training "
                              "images, or --token-loss-weight 0")

    def _validate_ranges(self) -> None:
        """Every remaining option checked before any work (#13)."""
        import math

        from ..engine.rundir import check_select
        from ..runtime.devices import check_device_name

        if self.epochs < 1:
            raise OptionError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise OptionError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not math.isfinite(self.lr):
            raise OptionError(f"--lr must be a positive number, got {self.lr}")
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)):
            raise OptionError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if self.max_images is not None and self.max_images < 1:
            raise OptionError(f"--max-images must be at least 1, got {self.max_images}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise OptionError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise OptionError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not (self.clip_grad >= 0 and math.isfinite(self.clip_grad)):
            raise OptionError(f"--clip-grad must be >= 0 (0 = off), got {self.clip_grad}")
        if not (self.gamma > 0 and math.isfinite(self.gamma)) or self.step_size < 1:
            raise OptionError("--gamma must be positive and --step-size at least 1")
        if not math.isfinite(self.dense_aux):
            raise OptionError(f"--dense-aux must be a finite number, got {self.dense_aux}")
        if self.num_detection_tokens is not None and self.num_detection_tokens < 1:
            raise OptionError(f"--det-tokens must be at least 1, got {self.num_detection_tokens}")
        if self.from_scratch and self.detector_config not in ("tiny", "micro", "nano"):
            raise OptionError(f"unknown --detector-config {self.detector_config!r}; choose tiny, micro or nano")
        if self.resample not in ("nearest", "any"):
            raise OptionError(f"unknown --resample {self.resample!r}; choose nearest or any")
        if self.dataset not in ("coco", "voc"):
            raise OptionError(f"unknown --dataset {self.dataset!r}; choose coco or voc")
        if self.detector_size is not None:
            h, w = self.detector_size
            if not (0 < h <= 16384 and 0 < w <= 16384):
                raise OptionError(f"--detector-size must be positive, got {h}x{w}")
        check_select(self.select)
        check_device_name(self.device)
