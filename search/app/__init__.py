"""The composition root: configuration, the FastAPI app and the `ltr-search` command line.

The only package allowed to import from every layer (indexing < search < ltr < eval < app);
the import-linter contract in pyproject.toml keeps the rest below it."""
