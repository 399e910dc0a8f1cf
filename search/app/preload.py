"""What `serve` loads before the app exists, shared with the app that serves it: XGBoost imported
without scikit-learn, and the active ranking model loaded onto an opened index.

`serve` opens the index and then the active model in a background thread while the main thread
imports the web stack (search/app/cli/serve.py); the first load of the serving state takes both
(search/app/state.py), so /ready does not wait for the model after the app is up. Light on
purpose: the CLI imports it before the web stack."""
from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ltr.ranker import LtrPipeline
    from search.backend import SearchBackend

logger = logging.getLogger("ltr_search.service")
_XGBOOST_IMPORT = threading.Lock()  # the main thread and the opening thread may both get here


HIDDEN_FROM_XGBOOST = ("sklearn", "xgboost.sklearn")  # what the engine never uses of XGBoost's optional imports


def import_xgboost_without_sklearn() -> None:
    """Import XGBoost with scikit-learn and its own scikit-learn wrappers hidden from it, unless
    XGBoost or scikit-learn is imported already.

    XGBoost imports scikit-learn at its own import time, when it is installed (here only for
    benches and peers: it is no dependency of the engine), to base its estimator wrappers on it;
    that pulls in scipy.stats and costs about 1.1 s of the service's start-up. Its wrappers
    (xgboost.sklearn, imported by xgboost.plotting) import scipy.special, about 0.13 s more; XGBoost
    imports both inside `try: ... except ImportError`, so hidden they are just left out. The engine
    uses only `Booster`, `DMatrix` and `train`, which need neither. Only XGBoost's import is
    affected: scikit-learn and xgboost.sklearn stay importable for anyone else afterwards. Under a
    lock: a second thread waits until XGBoost is imported rather than hiding them twice."""
    with _XGBOOST_IMPORT:
        if "xgboost" in sys.modules or "sklearn" in sys.modules:
            return
        for name in HIDDEN_FROM_XGBOOST:
            sys.modules[name] = None  # type: ignore[assignment]  # `import NAME` fails: XGBoost goes without
        try:
            import xgboost  # noqa: F401
        finally:
            for name in HIDDEN_FROM_XGBOOST:
                del sys.modules[name]


def load_model(index: SearchBackend, home: Path, events_path: Path, version: str = "active",
               name: str = "ltr") -> LtrPipeline:
    """The registry model `version` served as pipeline `name` on `index` (verified as
    `registry_pipeline` verifies it), warnings to the service's log."""
    import_xgboost_without_sklearn()
    from ltr.ranker import registry_pipeline  # lazy: the CLI imports this module before the web stack

    return registry_pipeline(index, home, version, name=name, warn=logger.warning, events_path=events_path)
