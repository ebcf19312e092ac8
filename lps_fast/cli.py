"""The ``lps-fast`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _info(args: argparse.Namespace) -> int:
    import lps_fast

    if args.json:
        print(json.dumps(lps_fast.backend_info(), indent=2, default=str))
    else:
        print(lps_fast.format_backend_info())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lps_fast import demo

    demo.main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lps-fast",
        description="Probabilistic symmetrization with fast kernels: inspect the build, run the demo.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="show which kernels are built and which runs each op")
    info.add_argument("--json", action="store_true", help="print the full backend_info() as JSON")
    info.set_defaults(run=_info)
    demo = commands.add_parser("demo", help="symmetrize a small MLP, check equivariance and time it")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
