"""What the service serves: one immutable snapshot of the index generation and its pipelines,
swapped atomically on reload, and the background rebuild jobs that produce new generations.

A request that started on the old generation finishes on it while new requests use the new one.
Under `serve --workers N` a reload in one worker rewrites a stamp file; every other worker sees it
change (one `os.stat` per request) and reloads before answering its next request.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from indexing.bundle import IndexBundleError, IndexBusyError
from indexing.elastic import ElasticsearchError
from ltr.drift import DriftMonitor
from ltr.experiments import ServedExperiments, scoring_problem
from ltr.ranker import LtrPipeline, ModelUnavailableError
from ltr.registry import Challenge, ModelRegistry, RegistryError
from search.app.config import ServiceConfig
from search.app.errors import ApiError
from search.app.preload import load_model
from search.app.pipelines import create_pipeline, default_candidates, pipeline_names, pipeline_spec
from search.app.schemas import JobStatus
from search.backend import SearchBackend
from search.interleaving import OPTIMIZED
from search.backend_factory import open_backend
from search.hybrid import HybridPipeline
from search.pipelines import Pipeline
from search.ranking import RankingPipeline

logger = logging.getLogger("ltr_search.service")
DENSE_PIPELINES = frozenset({"dense", "hybrid", "hybrid-convex", "ltr"})


@dataclass(frozen=True)
class Snapshot:
    """One loaded generation and the pipelines built on it; never mutated, only replaced."""

    index: SearchBackend
    pipelines: dict[str, RankingPipeline]
    default_pipeline: str
    model_version: str | None = None  # the active ranking model served as `ltr`
    model_error: str | None = None  # why `ltr` is not served, when it is not
    experiments: ServedExperiments | None = None  # None: no [experiments], or no active model
    drift: DriftMonitor | None = None  # the active model's served features against its training data


RELOAD_ERRORS = (IndexBundleError, ElasticsearchError, OSError, ValueError)  # the old generation keeps serving


class ReloadStamp:
    """A file shared by the workers of one service: whoever reloads replaces it (a new inode),
    the others compare its (inode, mtime) with the one they last acted on."""

    def __init__(self, path: Path):
        self.path = path
        self.seen = self.read()

    def read(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    def changed(self) -> bool:
        return self.read() != self.seen

    def announce(self) -> None:
        """Replace the stamp atomically; the announcer has already seen its own news."""
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()} {time.time()}\n")
            stat = os.fstat(handle.fileno())
        os.replace(temporary, self.path)  # rename keeps the inode and mtime fstat saw
        self.seen = stat.st_ino, stat.st_mtime_ns


class ServingState:
    """`opening`: the configured index already being opened (`serve` starts that before it imports
    the web stack, so the two overlap); the first load takes it instead of opening the index again.
    `model`: the active model already being loaded onto that index (None when it has no dense
    vectors); its errors are taken as if the first load had raised them itself."""

    def __init__(self, config: ServiceConfig, reload_stamp: Path | None = None, opening: Future[SearchBackend] | None = None,
                 model: Future[LtrPipeline | None] | None = None):
        self.config = config
        self._snapshot: Snapshot | None = None
        self._reload_lock = threading.Lock()
        self.load_error: str | None = None
        self._stamp = ReloadStamp(reload_stamp) if reload_stamp is not None else None
        self._opening = opening
        self._model = model

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def require(self) -> Snapshot:
        snapshot = self._snapshot
        if snapshot is None:
            raise ApiError(503, "not_ready", f"no index loaded: {self.load_error or 'still loading'}")
        return snapshot

    def reload(self, announce: bool = True) -> tuple[str | None, Snapshot]:
        """Open the active generation and swap it in; the old one keeps serving until then.
        `announce`: tell the other workers to follow (not for a worker's first load)."""
        with self._reload_lock:
            previous, snapshot = self._load()
            if announce and self._stamp is not None:
                self._stamp.announce()
            return previous, snapshot

    def follow_reloads(self) -> bool:
        """Per request: reload when another worker has (one `os.stat`); True when this call did.
        Threads of this worker that find a reload under way serve the old snapshot meanwhile."""
        stamp = self._stamp
        if stamp is None or not stamp.changed() or not self._reload_lock.acquire(blocking=False):
            return False
        try:
            news = stamp.read()
            if news == stamp.seen:  # another thread of this worker followed it already
                return False
            stamp.seen = news  # a reload that fails is not retried per request: the next announcement retries
            try:
                self._load()
            except RELOAD_ERRORS as exc:
                logger.error("following another worker's reload failed; still serving %s: %s",
                             self._snapshot.index.generation_id if self._snapshot else "nothing", exc)
                return False
            return True
        finally:
            self._reload_lock.release()

    def _load(self) -> tuple[str | None, Snapshot]:
        previous = self._snapshot.index.generation_id if self._snapshot else None
        opening, self._opening = self._opening, None  # used once: a reload opens the generation active then
        model, self._model = self._model, None
        if opening is not None:
            index = opening.result()  # raises what opening raised, as open_backend would here
        else:
            index, model = open_backend(self.config.home, self.config.index, self.config.backend,
                                        encoder_threads=self.config.threads), None
        self._snapshot = self._build(index, model)
        self.load_error = None
        return previous, self._snapshot

    def _serve(self, index: SearchBackend, first_stage: Pipeline) -> RankingPipeline:
        """A first stage wrapped with the service's window and exploration settings."""
        exploration = self.config.exploration
        return RankingPipeline(index, first_stage, self.config.rerank_window, epsilon=exploration.epsilon,
                               protected_top=exploration.protected_top, seed=exploration.seed, exploration=exploration.mode)

    def _build(self, index: SearchBackend, preloaded: Future[LtrPipeline | None] | None = None) -> Snapshot:
        """`preloaded`: the active model already loaded onto `index`, else it is loaded here."""
        config = self.config
        pipelines: dict[str, RankingPipeline] = {}
        for name in pipeline_names():
            if pipeline_spec(name).learned or (name in DENSE_PIPELINES and not index.has_dense):
                continue
            if name == "hybrid":
                first_stage = HybridPipeline(index, config.fusion_for(index.name))
            else:
                first_stage = create_pipeline(name, index)
            pipelines[name] = self._serve(index, first_stage)
        model_version, model_error, experiments, drift = None, None, None, None
        if index.has_dense:
            try:
                loaded = preloaded.result() if preloaded is not None else None  # raises what loading raised
                learned = loaded or load_model(index, config.home, config.event_store_path)
                pipelines["ltr"] = self._serve(index, learned)
                model_version = learned.version
                drift = DriftMonitor.for_manifest(learned.model.manifest)
                challenge = self._challenge(learned)
                if config.experiments.enabled or challenge is not None:
                    experiments = self._experiments(index, learned, challenge)
            except ModelUnavailableError as exc:
                model_error = str(exc)
            except RegistryError as exc:  # refused: parity, checksum or feature-set mismatch
                model_error = f"the active model was refused: {exc}"
                logger.error("%s", model_error)
        else:
            model_error = f"the ltr pipeline needs dense vectors; index '{index.name}' has none"
        default = next(name for name in default_candidates(config.default_pipeline) if name in pipelines)
        if default != config.default_pipeline:
            logger.warning("default pipeline %s unavailable on index %s; using %s", config.default_pipeline, index.name, default)
        return Snapshot(index, pipelines, default, model_version, model_error, experiments, drift)

    def _challenge(self, served: LtrPipeline) -> Challenge | None:
        """The registry's challenge against the served model (`ltr-search retrain --interleave`), unless
        the config names a challenger of its own; None when there is none, or it was started against
        another model (void since a promotion)."""
        if self.config.experiments.interleave_model is not None:
            return None
        try:
            challenge = ModelRegistry(self.config.home).challenge()
        except RegistryError as exc:  # an unreadable challenge never breaks serving
            logger.error("the registry's challenge is not used: %s", exc)
            return None
        if challenge is not None and challenge.against != served.version:
            logger.warning("the registry's challenge of %s was started against %s, not the served %s: not interleaved",
                           challenge.version, challenge.against, served.version)
            return None
        return challenge

    def _experiments(self, index: SearchBackend, served: LtrPipeline, challenge: Challenge | None = None) -> ServedExperiments:
        """Load the shadow and challenger models; one that cannot be used is logged and left out,
        never failing the generation (the active model serves as usual)."""
        settings = self.config.experiments
        if challenge is not None:
            settings = dataclasses.replace(settings, interleave_model=challenge.version, interleave_share=challenge.share)
        wanted = {"shadow": settings.shadow_model,
                  "interleave": settings.interleave_model if settings.interleave_share > 0 else None}
        loaded: dict[str, LtrPipeline] = {}
        chosen: dict[str, LtrPipeline | None] = {}
        errors: list[tuple[str, str]] = []
        for experiment, version in wanted.items():
            chosen[experiment] = None
            if version is None:
                continue
            try:
                if version not in loaded:
                    loaded[version] = load_model(index, self.config.home, self.config.event_store_path, version, name=experiment)
                other = loaded[version]
                problem = scoring_problem(served, other)
                if problem is None and experiment == "interleave" and other.version == served.version:
                    problem = "it is the active model: interleaving it with itself compares nothing"
                if problem is not None:
                    raise ValueError(problem)
                chosen[experiment] = other
            except Exception as exc:  # a model that cannot be used never breaks serving
                errors.append((experiment, f"{experiment} model {version} is not used: {exc}"))
                logger.error("%s", errors[-1][1])
        if chosen["interleave"] is not None and settings.interleave_method == OPTIMIZED:
            import scipy.optimize  # noqa: F401  # its first import takes ~0.3 s: here, not in an interleaved request
        return ServedExperiments(chosen["shadow"], chosen["interleave"], tuple(errors), settings)


@dataclass
class Job:
    job_id: str
    kind: str
    state: str = "running"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    generation: str | None = None
    error: str | None = None
    log: list[str] = field(default_factory=list)

    def status(self) -> JobStatus:
        return JobStatus(job_id=self.job_id, kind=self.kind, state=self.state, started_at=self.started_at,
                         finished_at=self.finished_at, generation=self.generation, error=self.error, log=self.log[-50:])


class JobRunner:
    """Index rebuilds in a background thread; at most one at a time per worker (the index's write
    lock refuses a second one from another worker or process).

    `jobs_dir`: where a job's status is also written when it starts and ends, so that any worker of
    `serve --workers N` can answer GET /admin/jobs/{id}, not only the one that runs it."""

    def __init__(self, state: ServingState, on_reload: Callable[[], None], jobs_dir: Path | None = None):
        self.state = state
        self.on_reload = on_reload
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.jobs_dir = jobs_dir
        if jobs_dir is not None:
            jobs_dir.mkdir(parents=True, exist_ok=True)

    def status(self, job_id: str) -> JobStatus | None:
        """A job of this worker, else one another worker recorded; None when there is none."""
        job = self.jobs.get(job_id)
        if job is not None:
            return job.status()
        if self.jobs_dir is None or not job_id.isalnum():
            return None
        try:
            return JobStatus.model_validate_json((self.jobs_dir / f"{job_id}.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def _record(self, job: Job) -> None:
        if self.jobs_dir is None:
            return
        temporary = self.jobs_dir / f".{job.job_id}.json"
        temporary.write_text(job.status().model_dump_json(), encoding="utf-8")
        os.replace(temporary, self.jobs_dir / f"{job.job_id}.json")  # readers never see half a file

    def start_rebuild(self) -> Job:
        with self._lock:
            if any(job.state == "running" for job in self.jobs.values()):
                raise ApiError(409, "busy", "a rebuild is already running; poll its status")
            job = Job(uuid.uuid4().hex, "rebuild")
            self.jobs[job.job_id] = job
            self._record(job)
        threading.Thread(target=self._rebuild, args=(job,), name=f"rebuild-{job.job_id[:8]}", daemon=True).start()
        return job

    def _rebuild(self, job: Job) -> None:
        config = self.state.config
        try:
            if config.backend.is_elasticsearch:  # a new generation index, verified, then the alias switch
                from indexing.elastic_build import rebuild_elastic_index

                summary = rebuild_elastic_index(config.home, config.index, config.backend.elasticsearch, progress=False,
                                                log=job.log.append)
            else:
                from indexing.build import rebuild_index  # lazy: start-up time

                summary = rebuild_index(config.home, config.index, progress=False, log=job.log.append)
            job.generation = summary.generation
            self.state.reload()
            self.on_reload()
            job.state = "succeeded"
        except IndexBusyError as exc:
            job.state, job.error = "failed", f"index is locked by another writer: {exc}"
        except Exception as exc:  # the job reports every failure; serving goes on with the old generation
            logger.exception("rebuild failed")
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            job.finished_at = time.time()
            try:
                self._record(job)
            except OSError as exc:  # the job's own worker still answers for it
                logger.error("job %s status not recorded for the other workers: %s", job.job_id, exc)
