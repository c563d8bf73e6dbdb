"""Thin typer front end over bavit_core."""
