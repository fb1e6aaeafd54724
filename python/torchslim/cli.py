"""The torchslim command line: ``torchslim info | bench <family> | demo``."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    import torchslim
    from torchslim._info import format_info

    data = torchslim.info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from torchslim.benchmarks import bench_attention, bench_int4, bench_quant, bench_sparse

    benchmarks = {
        "int8": bench_quant.main,
        "int4": bench_int4.main,
        "sparse": bench_sparse.main,
        "attention": bench_attention.main,
    }
    return benchmarks[args.family](args.rest)


def _demo(args: argparse.Namespace) -> int:
    from torchslim import demo

    return demo.main(args.rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchslim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, CPU features, ISA and backends")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.set_defaults(fn=_info)
    p_bench = sub.add_parser(
        "bench",
        help="microbenchmarks against the baselines",
        description="`torchslim bench FAMILY --help` lists a family's own options.",
        add_help=False,
    )
    p_bench.add_argument(
        "family", nargs="?", choices=["int8", "int4", "sparse", "attention"], help="kernel family"
    )
    p_bench.set_defaults(fn=_bench)
    p_demo = sub.add_parser(
        "demo", help="a real LLM: float vs torchslim layers, side by side", add_help=False
    )
    p_demo.set_defaults(fn=_demo)
    # bench and demo take their own options (see `torchslim bench int8 --help`).
    args, rest = parser.parse_known_args(argv)
    if rest and args.command == "info":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "bench" and args.family is None:
        if {"-h", "--help"} & set(rest):
            p_bench.print_help()
            return 0
        p_bench.error("the following arguments are required: family")
    try:  # the settings torchslim reads from the environment, checked once here
        import torchslim
        from torchslim.ops import _registry

        _registry.forced_backend(), _registry.strict_mode()
    except ValueError as exc:
        parser.exit(2, f"torchslim: error: {exc}\n")
    del torchslim
    args.rest = rest
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
