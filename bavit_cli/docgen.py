"""Render docs/cli.md from the commands' own --help (``python -m bavit_cli.docgen``)."""
from __future__ import annotations

import sys

import click
import typer

from .main import COMMANDS, app

HEADER = """# Command reference

Generated from each command's `--help` by `python -m bavit_cli.docgen > docs/cli.md`;
a test fails when this page is stale or a command is missing.
"""


def _help(cmd: click.Command, name: str, parent: click.Context | None = None) -> str:
    ctx = click.Context(cmd, info_name=name, parent=parent, terminal_width=100, max_content_width=100)
    return cmd.get_help(ctx)


def render() -> str:
    root = typer.main.get_command(app)
    root_ctx = click.Context(root, info_name="bavit", terminal_width=100, max_content_width=100)
    from .vocabulary import render as vocabulary

    parts = [HEADER, vocabulary(), "## bavit\n", "```text\n" + root.get_help(root_ctx) + "\n```\n"]
    for name in COMMANDS:
        cmd = root.get_command(root_ctx, name)
        parts.append(f"## bavit {name}\n")
        parts.append("```text\n" + _help(cmd, name, root_ctx) + "\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render())
