"""The lower bounds of the library's dependencies, as exact pins.

``python .ci/lower_bounds.py`` prints one ``name==version`` line per entry of
``[project].dependencies`` in pyproject.toml (its ``>=`` bound), for ``pip install -c``;
``python .ci/lower_bounds.py --check`` exits non-zero unless the installed versions are exactly
those. The lower-bounds CI job runs the default suite on them, so a bound in pyproject.toml is a
version that was tested.
"""

import argparse
import importlib.metadata
import pathlib
import re
import sys
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"


def lower_bounds(pyproject=PYPROJECT):
    """``{name: version}`` for each runtime dependency; each must carry a ``>=`` bound."""
    deps = tomllib.loads(pathlib.Path(pyproject).read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(,.*)?", dep)
        if m is None:
            raise ValueError(f"dependency without a >= lower bound: {dep!r}")
        out[m.group(1)] = m.group(2)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check the installed versions")
    args = parser.parse_args(argv)
    bounds = lower_bounds()
    if not args.check:
        print("\n".join(f"{name}=={version}" for name, version in bounds.items()))
        return 0
    from packaging.version import Version  # pytest's dependency: there once the suite is

    bad = []
    for name, version in bounds.items():
        installed = importlib.metadata.version(name)
        print(f"{name}: installed {installed}, lower bound {version}")
        if Version(installed) != Version(version):  # 2.0 == 2.0.0
            bad.append(name)
    if bad:
        print(f"not at their lower bounds: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
