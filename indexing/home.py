"""The engine home: one place that says where every file of the engine lives.

    HOME/indexes/INDEX/...             index generations (indexing.bundle)
    HOME/encoders/...                  exported ONNX encoders, shared by every index
    HOME/models/...                    the model registry (ltr.registry)
    HOME/events/INDEX.sqlite3          the request log and behaviour events (search.event_store)
    HOME/behaviour/INDEX.sqlite3       behaviour aggregates derived from the events (ltr.behaviour)
    HOME/experiments/INDEX.sqlite3     interleaved and shadow rankings (ltr.experiments)
    HOME/judgments/INDEX.sqlite3       relevance judgments from the workbench (eval.judgments)
    HOME/runs/DATASET-SPLIT/           TREC runs written by `ltr-search eval`
    HOME/reports/                      reports written by jobs

The home is `--home`, else $LTR_SEARCH_HOME, else ./.ltr-search.
"""
from __future__ import annotations

import os
from pathlib import Path

HOME_ENV_VAR = "LTR_SEARCH_HOME"
DEFAULT_HOME = Path(".ltr-search")


def resolve_home(cli_value: str | os.PathLike[str] | None = None) -> Path:
    """The engine home: `--home`, else $LTR_SEARCH_HOME, else ./.ltr-search."""
    if cli_value:
        return Path(cli_value).expanduser().resolve()
    env_value = os.environ.get(HOME_ENV_VAR)
    if env_value:
        return Path(env_value).expanduser().resolve()
    return DEFAULT_HOME.resolve()


def indexes_dir(home: Path) -> Path:
    return Path(home) / "indexes"


def encoders_dir(home: Path) -> Path:
    """Exported ONNX encoders, shared by every index in this home (content-addressed)."""
    return Path(home) / "encoders"


def registry_dir(home: Path) -> Path:
    return Path(home) / "models"


def event_store_path(home: Path, index: str) -> Path:
    return Path(home) / "events" / f"{index}.sqlite3"


def behaviour_store_path(home: Path, index: str) -> Path:
    """Next to the event store, from which the aggregates are derived."""
    return Path(home) / "behaviour" / f"{index}.sqlite3"


def experiment_log_path(home: Path, index: str) -> Path:
    return Path(home) / "experiments" / f"{index}.sqlite3"


def judgments_path(home: Path, index: str) -> Path:
    return Path(home) / "judgments" / f"{index}.sqlite3"


def runs_dir(home: Path, dataset: str, split: str) -> Path:
    return Path(home) / "runs" / f"{dataset}-{split}"


def reports_dir(home: Path) -> Path:
    return Path(home) / "reports"
