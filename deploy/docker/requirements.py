"""Print the project's dependencies from pyproject.toml, one per line.

Used by the Dockerfile to install dependencies in a layer that is cached on
pyproject.toml alone (the source is copied afterwards and installed with --no-deps).

    python3 requirements.py pyproject.toml [--extra train] [--exclude onnxruntime]
"""

from __future__ import annotations

import argparse
import re
import tomllib


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("pyproject")
    p.add_argument("--extra", action="append", default=[], help="optional-dependency group")
    p.add_argument("--exclude", action="append", default=[], help="distribution to leave out")
    args = p.parse_args()
    with open(args.pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project.get("dependencies", []))
    for extra in args.extra:
        reqs += project.get("optional-dependencies", {})[extra]
    excluded = {_name(x) for x in args.exclude}
    for req in reqs:
        if _name(req) not in excluded:
            print(req)


if __name__ == "__main__":
    main()
