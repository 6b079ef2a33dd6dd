"""A library changes nothing it does not own: the user's matplotlib backend, numpy's BLAS
thread pool. And the repository is complete on its own: packaging metadata that builds,
documentation that links only inside the repository and names modules that exist."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, **env: str) -> str:
    """Run code in a fresh interpreter importing this checkout's jitgrad; its stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_plotting_leaves_the_users_matplotlib_alone(tmp_path):
    pytest.importorskip("matplotlib")
    out = run_python(f"""
        import sys
        import matplotlib
        matplotlib.use("pdf")  # the user's choice (an interactive one in a notebook)
        import numpy as np
        import jitgrad as jg
        from jitgrad.tools import memsweep
        from jitgrad.compiler.backend import plan_program
        from jitgrad.timeline import plot_timeline

        f = jg.grad(lambda w, x: jg.sum(jg.tanh(x @ w)))
        prog = jg.jit(f, backend="interpret").lower(np.ones((3, 2)), np.ones((4, 3))).program
        plot_timeline(plan_program(prog).plan, {str(tmp_path / "t.png")!r})
        rows = [{{"policy": "none", "budget": "", "planned_peak": 2**20,
                  "measured_peak": 2**20, "step_ms": 1.0}}]
        memsweep.plot_frontier(rows, {str(tmp_path / "f.png")!r}, "title")
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
    """)
    assert out.split() == ["pdf", "False"]
    for name in ("t.png", "f.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_numpys_blas_threads_are_left_as_they_were():
    pytest.importorskip("threadpoolctl")
    out = run_python("""
        import os
        import numpy as np
        import scipy
        from threadpoolctl import threadpool_info, threadpool_limits

        def under(module, path):
            root = os.path.dirname(os.path.realpath(module.__file__))
            return os.path.realpath(path).startswith((root + os.sep, root + ".libs" + os.sep))

        def counts(module):
            return [lib["num_threads"] for lib in threadpool_info()
                    if lib["user_api"] == "blas" and under(module, lib["filepath"])]

        import scipy.linalg  # loads scipy's BLAS, the one Numba calls
        mine = [lib["filepath"] for lib in threadpool_info()
                if lib["user_api"] == "blas" and under(np, lib["filepath"])]
        threadpool_limits({path: 2 for path in mine})  # the user's setting for numpy
        before = counts(np)

        import jitgrad as jg
        a = np.ones((64, 64), np.float32)
        assert np.allclose(jg.jit(lambda x, y: x @ y)(a, a), a @ a)
        print(before, counts(np), counts(scipy))
    """, JITGRAD_NUM_THREADS="1", JITGRAD_GEMM="openblas")  # scipy's BLAS computes it
    numpy_before, numpy_after, scipy_after = (ast.literal_eval(s) for s in
                                               re.findall(r"\[[^\]]*\]", out))
    assert numpy_after == numpy_before  # numpy's pool is the user's
    assert all(n == 1 for n in scipy_after)  # the pool Numba's np.dot uses got the count


def test_build_requirements_support_the_license_field():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    license_field = meta["project"].get("license")
    if isinstance(license_field, str):  # an SPDX expression (PEP 639): setuptools >= 77
        req = next(r for r in meta["build-system"]["requires"] if r.startswith("setuptools"))
        m = re.fullmatch(r"setuptools\s*>=\s*(\d+)(\.\d+)*", req)
        assert m and int(m.group(1)) >= 77, req


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_documentation_links_stay_inside_the_repository():
    for doc in _doc_files():
        text = doc.read_text()
        # markdown links and images, and `path.md` mentions in code spans
        targets = re.findall(r"\]\(([^)#\s]+)", text) + re.findall(r"`([^`\s]+\.md)`", text)
        for t in targets:
            if re.match(r"[a-z]+://", t):
                continue
            path = (doc.parent / t).resolve()
            assert path.is_relative_to(ROOT), f"{doc.name} points outside the repository: {t}"
            assert path.exists(), f"{doc.name} links to a missing file: {t}"


def test_the_design_document_names_only_modules_that_exist():
    text = (ROOT / "docs" / "design.md").read_text()
    modules = set(re.findall(r"`((?:ops/)?[a-z_]+\.py)`", text))
    assert {"api.py", "codegen.py", "memory.py", "ops/elementwise.py"} <= modules
    package = ROOT / "jitgrad"
    files = {str(p.relative_to(package)): p for p in package.rglob("*.py")}

    def found(m):  # a path under a layer folder (`ops/elementwise.py` in frontend/)
        return [p for rel, p in files.items() if rel == m or rel.endswith("/" + m)]

    for m in modules:
        assert found(m), f"docs/design.md names jitgrad/{m}"
    # `module.name` references to functions and classes
    import importlib
    for mod, name in re.findall(r"`([a-z_]+)\.([A-Za-z_]+)", text):
        hits = found(f"{mod}.py")
        if name != "py" and hits:
            dotted = ".".join(hits[0].relative_to(ROOT).with_suffix("").parts)
            module = importlib.import_module(dotted)
            assert hasattr(module, name), f"docs/design.md names {mod}.{name}"
