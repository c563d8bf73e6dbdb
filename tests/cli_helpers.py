"""Run the CLI in-process and split its output streams."""
from typer.testing import CliRunner

from bavit_cli.main import app


def run_cli(*args: str):
    runner = CliRunner()
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr
