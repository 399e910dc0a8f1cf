"""Start-up time of `ltr-search`: the parser loads no command's code, and a BM25 search loads
neither xgboost nor the ltr and eval packages (issue 14: --help <= 0.3 s, bm25 search <= 1.0 s)."""
from __future__ import annotations

import subprocess
import sys

from search.app.cli.common import BACKEND_CHOICES
from tests.conftest import ROOT

PROBE = """
import sys
from search.app.cli.main import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ('numpy', 'xgboost', 'scipy', 'ltr', 'eval', 'fastapi', 'search.hybrid') if m in sys.modules)
print('LOADED', ','.join(heavy), file=sys.stderr)
"""


def loaded(argv: list[str]) -> set[str]:
    result = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    line = next(line for line in result.stderr.splitlines() if line.startswith("LOADED"))
    return set(filter(None, line.split(" ", 1)[1].split(",")))


def test_help_loads_no_heavy_module():
    assert loaded(["--help"]) == set()


def test_bm25_search_loads_no_ltr_eval_or_xgboost(tmp_path, small_corpus):
    home = tmp_path / "home"
    subprocess.run([sys.executable, "-m", "search.app.cli", "--home", str(home), "index", "build", "--dataset",
                    str(small_corpus), "--no-dense", "--quiet"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    modules = loaded(["--home", str(home), "search", "cats", "--pipeline", "bm25"])
    assert "numpy" in modules  # it did search
    assert not modules & {"xgboost", "ltr", "eval", "fastapi", "search.hybrid"}, modules


def test_backend_choices_match_the_factory():
    from search.backend_factory import BACKENDS

    assert BACKEND_CHOICES == BACKENDS
