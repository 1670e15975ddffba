"""The CI workflows parse and say what they are for: the default suite on every supported Python
through ``.ci/run``, the slow suite and the notebooks nightly, the numerics on the optimized
programs, ruff, the package and the lower bounds; ``.ci/run`` runs the README's test line."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest
import yaml  # a dependency of flax, so there wherever the library is

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# (lowest, highest) of each field of a cron expression: minute hour day month weekday.
CRON_FIELDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]


def load(path):
    return yaml.safe_load(pathlib.Path(path).read_text())


def triggers(wf):
    """The ``on:`` mapping (YAML 1.1 reads a bare ``on`` key as True); a list or a string of
    event names becomes a mapping to None."""
    on = wf.get("on", wf.get(True))
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    return on


def cron_problems(expr):
    fields = str(expr).split()
    if len(fields) != 5:
        return [f"cron {expr!r}: {len(fields)} fields, not 5"]
    out = []
    for field, (lo, hi) in zip(fields, CRON_FIELDS, strict=True):
        for part in field.split(","):
            m = re.fullmatch(r"(\*|\d+)(?:-(\d+))?(?:/(\d+))?", part)
            if m is None:
                out.append(f"cron {expr!r}: cannot read {part!r}")
                continue
            values = [int(v) for v in m.groups()[:2] if v not in (None, "*")]
            if any(not lo <= v <= hi for v in values):
                out.append(f"cron {expr!r}: {part!r} outside {lo}-{hi}")
    return out


def workflow_problems(wf):
    """What GitHub would reject or a reader would miss in one workflow: triggers, jobs with a
    runner and steps, every step a ``uses`` (``owner/repo@ref``) or a ``run``, a time limit."""
    if not isinstance(wf, dict):
        return ["not a mapping"]
    out = [] if wf.get("name") else ["no name"]
    on = triggers(wf)
    if not on:
        out.append("no triggers (on:)")
    for entry in (on or {}).get("schedule") or []:
        out += cron_problems(entry.get("cron"))
    jobs = wf.get("jobs")
    if not isinstance(jobs, dict) or not jobs:
        return out + ["no jobs"]
    for name, job in jobs.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
            out.append(f"{name}: not a valid job id")
        if not isinstance(job, dict):
            out.append(f"{name}: not a mapping")
            continue
        if not job.get("runs-on"):
            out.append(f"{name}: no runs-on")
        if not isinstance(job.get("timeout-minutes"), int):
            out.append(f"{name}: no timeout-minutes")
        steps = job.get("steps")
        if not isinstance(steps, list) or not steps:
            out.append(f"{name}: no steps")
            continue
        for i, step in enumerate(steps):
            if not isinstance(step, dict) or ("uses" in step) == ("run" in step):
                out.append(f"{name} step {i}: needs exactly one of uses and run")
            elif "uses" in step and not re.fullmatch(r"[\w.-]+/[\w./-]+@[\w.-]+", step["uses"]):
                out.append(f"{name} step {i}: uses {step['uses']!r} is not owner/repo@ref")
            elif "run" in step and not str(step["run"]).strip():
                out.append(f"{name} step {i}: empty run")
    return out


def runs(job):
    """Every ``run`` script of a job, joined, with folded lines made one line."""
    return "\n".join(" ".join(str(s["run"]).split()) for s in job["steps"] if "run" in s)


def job_with(wf, needle):
    """The one job of a workflow whose run scripts contain ``needle``."""
    found = [j for j in wf["jobs"].values() if needle in runs(j)]
    assert len(found) == 1, f"{len(found)} jobs run {needle!r}"
    return found[0]


def readme_test_line():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^# 2\. the tests.*\n(.+)$", readme, re.M)
    assert m, "the README's Quickstart has no '# 2. the tests' line"
    return m.group(1).strip()


@pytest.fixture(scope="module")
def ci():
    return load(ROOT / ".github" / "workflows" / "ci.yml")


@pytest.fixture(scope="module")
def nightly():
    return load(ROOT / ".github" / "workflows" / "nightly.yml")


def test_every_workflow_parses_and_keeps_the_schema():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "nightly.yml"}
    for path in WORKFLOWS:
        assert workflow_problems(load(path)) == [], path.name


def test_the_schema_check_catches_broken_workflows():
    good = {
        "name": "x",
        "on": {"schedule": [{"cron": "0 3 * * *"}]},
        "jobs": {"a": {"runs-on": "ubuntu-latest", "timeout-minutes": 5, "steps": [{"run": "x"}]}},
    }
    assert workflow_problems(good) == []
    assert workflow_problems(yaml.safe_load("name: x\non: [push]\njobs: {}\n")) == ["no jobs"]
    broken = [
        ("runs-on", None),
        ("steps", []),
        ("steps", [{"name": "neither"}]),
        ("steps", [{"uses": "actions/checkout@v4", "run": "both"}]),
        ("steps", [{"uses": "actions/checkout"}]),
        ("timeout-minutes", None),
    ]
    for key, value in broken:
        job = dict(good["jobs"]["a"], **{key: value})
        assert workflow_problems(dict(good, jobs={"a": job})), (key, value)
    for cron in ["0 3 * *", "60 3 * * *", "0 24 * * *", "0 3 * * 7", "x 3 * * *"]:
        assert workflow_problems(dict(good, on={"schedule": [{"cron": cron}]})), cron
    assert workflow_problems(dict(good, on=None))


def test_ci_runs_the_default_suite_on_every_supported_python(ci):
    on = triggers(ci)
    assert "push" in on and "pull_request" in on
    job = job_with(ci, "bash .ci/run")
    versions = job["strategy"]["matrix"]["python-version"]
    assert versions == ["3.11", "3.12", "3.13"]
    lowest = re.fullmatch(r">=\s*(3\.\d+)", PYPROJECT["project"]["requires-python"]).group(1)
    assert versions[0] == lowest, "the matrix starts at requires-python"
    setup = [s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@")]
    assert setup and setup[0]["with"]["python-version"] == "${{ matrix.python-version }}"
    assert job["steps"][-1]["run"].strip() == "bash .ci/run"


def test_ci_runs_the_readme_test_command():
    line = readme_test_line()
    assert "python -m pytest" in line and " -n " in line, line
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [s for s in script if s.strip() and not s.lstrip().startswith("#")]
    assert commands[-1] == line, "the last line of .ci/run is the README's test command"
    assert any(
        d.startswith("pytest-xdist") for d in PYPROJECT["project"]["optional-dependencies"]["test"]
    )


def test_numerics_run_with_xla_optimizations_on(ci):
    job = job_with(ci, "tests/test_linalg.py")
    step = next(s for s in job["steps"] if "tests/test_linalg.py" in str(s.get("run", "")))
    assert step["env"]["MANIFOLD_OPTAX_TEST_FULL_OPT"] == "1"
    files = re.findall(r"tests/\S+\.py", runs(job))
    for name in ["test_linalg.py", "test_correctness.py", "test_manifold_contract.py"]:
        assert f"tests/{name}" in files, name
    assert all((ROOT / f).is_file() for f in files), files
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert 'os.environ.get("MANIFOLD_OPTAX_TEST_FULL_OPT")' in conftest


def test_ruff_checks_and_formats(ci):
    job = job_with(ci, "ruff check")
    assert "ruff check ." in runs(job) and "ruff format --check ." in runs(job)


def test_the_package_builds_installs_and_imports(ci):
    text = runs(job_with(ci, "python -m build"))
    assert "twine check" in text
    assert re.search(r"python -m venv .*\n?.*pip\"? install .*dist/\*\.whl", text)
    assert "import manifold_optax" in text


def test_a_job_tests_the_lower_bounds(ci, tmp_path):
    job = job_with(ci, ".ci/lower_bounds.py")
    text = runs(job)
    assert "pip install -q -c lower-bounds.txt" in text and ".ci/lower_bounds.py --check" in text
    assert "python -m pytest" in text
    setup = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == "3.11"

    spec = importlib.util.spec_from_file_location("lower_bounds", ROOT / ".ci" / "lower_bounds.py")
    lb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lb)
    bounds = lb.lower_bounds()
    deps = PYPROJECT["project"]["dependencies"]
    assert len(bounds) == len(deps)
    assert all(f"{name}>={version}" in deps for name, version in bounds.items())
    unbounded = tmp_path / "pyproject.toml"
    unbounded.write_text('[project]\ndependencies = ["jax>=0.10", "optax"]\n')
    with pytest.raises(ValueError, match="optax"):
        lb.lower_bounds(unbounded)


def test_nightly_runs_the_slow_suite_and_the_notebooks(nightly):
    on = triggers(nightly)
    assert "workflow_dispatch" in on
    crons = [e["cron"] for e in on["schedule"]]
    assert len(crons) == 1 and cron_problems(crons[0]) == []
    minute, hour, day, month, weekday = crons[0].split()
    assert (day, month, weekday) == ("*", "*", "*") and minute.isdigit() and hour.isdigit(), (
        "nightly: once a day"
    )
    assert re.search(r"python -m pytest -q -m slow\b", runs(job_with(nightly, "-m slow")))
    docs = runs(job_with(nightly, "sphinx"))
    assert "nb_execution_mode" not in docs, "the docs build executes the notebooks"
    assert "-W" in docs


def test_xdist_groups_run_on_one_worker(tmp_path):
    """The README's ``-n auto`` with the configured ``--dist loadgroup`` keeps the tests of one
    ``xdist_group`` on one worker, so a session fixture that starts subprocesses (the
    multi-process and sharding checks) runs once: a 3-test group on 2 workers, each worker
    noting the group's fixture when it builds it."""
    (tmp_path / "test_grouped.py").write_text(
        "import os, pytest\n"
        "pytestmark = pytest.mark.xdist_group('g')\n"
        "@pytest.fixture(scope='session')\n"
        "def built():\n"
        "    with open(os.environ['GROUP_LOG'], 'a') as f:\n"
        "        f.write(os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n"
        "@pytest.mark.parametrize('i', range(3))\n"
        "def test_member(built, i):\n"
        "    pass\n"
        "@pytest.mark.parametrize('i', range(4))\n"
        "def test_other(i):\n"
        "    pass\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    log = tmp_path / "built.log"
    env = dict(os.environ, GROUP_LOG=str(log))
    dist = PYPROJECT["tool"]["pytest"]["ini_options"]["addopts"]
    dist = dist[dist.index("--dist") : dist.index("--dist") + 2]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", *dist, "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(log.read_text().split()) == 1, (log.read_text(), done.stdout)
