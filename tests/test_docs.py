"""The documentation cannot rot: the site builds with warnings as errors, the README's Python
blocks run as written, and the benchmarks page is what its generator makes of the results."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code_or_args, **kw):
    """A fresh interpreter, so that Sphinx and the README leave nothing behind in the suite's
    process (logging, warning filters, compiled programs)."""
    return subprocess.run(
        [sys.executable, *code_or_args], cwd=ROOT, capture_output=True, text=True, **kw
    )


def test_docs_build_without_warnings(tmp_path):
    # Notebooks are not executed here (the notebook tests run them); everything else is built
    # as the site is.
    args = ["-W", "--keep-going", "-q", "-b", "html", "-D", "nb_execution_mode=off"]
    out = _run(["-m", "sphinx", *args, "docs", str(tmp_path / "html")])
    assert out.returncode == 0, out.stderr[-4000:]
    api = (tmp_path / "html" / "api_reference.html").read_text()
    assert "manifold_muon" in api and "Example" in api


def test_readme_python_blocks_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    # In order, in one namespace, as a reader would paste them.
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks))
    out = _run([str(script)])
    assert out.returncode == 0, out.stderr[-4000:]
    assert "max |WᵀW − I|" in out.stdout


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_benchmarks_page_is_generated_from_the_results(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_benchmarks_page.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    committed = (ROOT / "docs" / "benchmarks.md").read_text()
    assert (tmp_path / "benchmarks.md").read_text() == committed, (
        "docs/benchmarks.md is stale: run python tools/make_benchmarks_page.py"
    )
    for image in re.findall(r"\]\((benchmarks_plots/[^)]+)\)", committed):
        assert (ROOT / "docs" / image).exists(), image
    assert committed.count("*Machine:*") >= 6
