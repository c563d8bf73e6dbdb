"""The ``bavit`` command: one module per subcommand, registered here."""
from __future__ import annotations

from typing import Optional

import typer

from bavit_core import __version__

from . import bench as _bench
from . import demo as _demo
from . import detect as _detect
from . import export as _export
from . import finetune as _finetune
from . import label as _label
from . import postprocess as _postprocess
from . import predict as _predict
from . import prune_eval as _prune_eval
from . import report as _report
from . import synth as _synth
from . import train as _train

app = typer.Typer(
    name="bavit",
    help="Background-aware token pruning for ViT detectors (BAViT): label, train, prune, evaluate, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bavit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Background-aware token pruning for ViT detectors (BAViT).

    \b
    Example:
        bavit synth --out data/shapes && bavit label --root data/shapes --out labels.parquet
    """


COMMANDS = {
    "synth": _synth.synth,
    "label": _label.label,
    "train": _train.train,
    "predict": _predict.predict,
    "postprocess": _postprocess.postprocess,
    "prune-eval": _prune_eval.prune_eval_cmd,
    "finetune": _finetune.finetune,
    "report": _report.report,
    "export": _export.export,
    "bench": _bench.bench,
    "detect": _detect.detect,
    "demo": _demo.demo,
}
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)


def main() -> None:
    app()
