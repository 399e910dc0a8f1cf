"""`ltr-search`: one command-line entry point, one module per command group."""
from search.app.cli.main import main

__all__ = ["main"]
