"""``python -m streamify`` runs the CLI."""

from streamify.cli.app import main

main()
