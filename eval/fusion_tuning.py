"""`hybrid-tuned`: convex fusion whose weight and normalisation are chosen on judged training
queries by an evaluation metric. It lives in eval because its objective is an eval metric; the
fusion itself is `search.hybrid`."""
from __future__ import annotations

from typing import Any, Mapping

from eval.metrics import evaluate_run
from search.backend import Hit, SearchBackend
from search.fusion import CONVEX_WEIGHT_GRID, NORMALISATIONS
from search.hybrid import FusionSettings, HybridPipeline, fused_scores

TUNING_METRIC = "nDCG@10"
TUNING_WEIGHTS = CONVEX_WEIGHT_GRID


class TunedHybridPipeline(HybridPipeline):
    """Convex fusion whose dense weight and normalisation are chosen on training queries by
    grid search (nDCG@10); the grid and its scores are kept in `tuning` for the record."""

    def __init__(self, backend: SearchBackend, name: str = "hybrid-tuned"):
        super().__init__(backend, FusionSettings(method="convex"), name)
        self.fitted = False
        self.tuning: list[dict[str, Any]] = []

    def fit(self, queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]]) -> "TunedHybridPipeline":
        windows = {query_id: self.candidates(text) for query_id, text in queries.items()}
        judged = {q: dict(qrels[q]) for q in queries}
        best: tuple[float, FusionSettings] | None = None
        self.tuning = []
        for normalisation in NORMALISATIONS:
            for weight in TUNING_WEIGHTS:
                settings = FusionSettings(
                    method="convex", dense_weight=weight, normalisation=normalisation,
                    bm25_candidates=self.settings.bm25_candidates, dense_candidates=self.settings.dense_candidates,
                )
                run = {
                    q: dict(zip(w.doc_ids, fused_scores(w, settings).tolist())) for q, w in windows.items()
                }
                score = evaluate_run(run, judged, [TUNING_METRIC]).mean()[TUNING_METRIC]
                self.tuning.append({"normalisation": normalisation, "dense_weight": weight, TUNING_METRIC: score})
                if best is None or score > best[0]:
                    best = (score, settings)
        assert best is not None
        self.settings = best[1]
        self.fitted = True
        return self

    def fitted_parameters(self) -> dict[str, Any]:
        """What fit chose, for experiment records."""
        best = max(self.tuning, key=lambda row: row[TUNING_METRIC]) if self.tuning else {}
        return {"normalisation": self.settings.normalisation, "dense_weight": self.settings.dense_weight,
                f"train {TUNING_METRIC}": best.get(TUNING_METRIC)}

    def search(self, query: str, k: int) -> list[Hit]:
        if not self.fitted:
            raise ValueError(f"pipeline '{self.name}' is tuned on judged training queries; run it through `ltr-search eval`")
        return super().search(query, k)
