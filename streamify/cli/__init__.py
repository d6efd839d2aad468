"""Command-line interface (Typer): thin commands that build a recipe and call the runner."""
