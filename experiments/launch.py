"""Run a metassl command on the Ray cluster this script is started on (the `ray submit` entry point).

    ray submit cluster/aws.yaml experiments/launch.py -- train experiments/omniglot_unsupervised.yaml --workers 4
    ray submit cluster/local.yaml experiments/launch.py -- tune experiments/tune_omniglot.yaml

`ray submit` copies this file to the head node and runs it there with the arguments after
`--`. The cluster's setup commands installed metassl and mounted the project folder at
~/metassl ($METASSL_PROJECT overrides it), so relative config paths resolve from there;
the command joins the running cluster (RAY_ADDRESS=auto unless set) instead of starting one.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_ADDRESS", "auto")
    project = Path(os.environ.get("METASSL_PROJECT", Path.home() / "metassl"))
    if project.is_dir():
        os.chdir(project)
    from metassl.cli import main as metassl

    return metassl(args)


if __name__ == "__main__":
    sys.exit(main())
