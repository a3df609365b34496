"""The ``fcn-fast`` command: make-data, train, eval, predict, export, demo, bench.

User mistakes (a missing file, a bad value, a checkpoint of another model) end with one line on stderr naming the
file or value, and exit status 1; an unknown option is an argparse error (status 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from fcn_fast.errors import UserError


def _make_data(args) -> None:
    from fcn_fast.data import make_synthetic

    size = tuple(args.size) if len(args.size) == 2 else (args.size[0], args.size[0])
    root = make_synthetic(args.dir, train=args.train, val=args.val, size=size, seed=args.seed)
    print(f"wrote the synthetic data set ({args.train} train + {args.val} val images of {size[0]}x{size[1]}) to "
          f"{root}")


def _train(args) -> None:
    from fcn_fast import train

    train.main(args)


def _eval(args) -> None:
    from fcn_fast import evaluate

    evaluate.main(args)


def _predict(args) -> None:
    from fcn_fast import predict

    predict.main(args)


def _export(args) -> None:
    from fcn_fast import export

    export.main(args)


def _demo(args) -> None:
    from fcn_fast import demo

    demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    from fcn_fast import demo, evaluate, export, predict, train

    parser = argparse.ArgumentParser(prog="fcn-fast", description="Train, evaluate and run FCNs (fcn_fast).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-data", help="write the synthetic data set (VOC layout)")
    p.add_argument("dir", help="new folder to write")
    p.add_argument("--train", type=int, default=200, help="training images (default: 200)")
    p.add_argument("--val", type=int, default=50, help="validation images (default: 50)")
    p.add_argument("--size", type=int, nargs="+", default=[96], metavar="H [W]", help="image size (default: 96)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_data)

    for name, module, run, text in (
            ("train", train, _train, "train a model (whole images; staged with --init-from)"),
            ("eval", evaluate, _eval, "metrics of a checkpoint on a split"),
            ("predict", predict, _predict, "label images with a checkpoint"),
            ("export", export, _export, "a checkpoint as a torch.export .pt2 or an ONNX file (dynamic image size)"),
            ("demo", demo, _demo, "synthetic data, staged FCN-32s -> 16s -> 8s training, evaluation, table")):
        p = sub.add_parser(name, help=text)
        module.add_arguments(p)
        p.set_defaults(func=run)

    sub.add_parser("bench", help="benchmarks of the fused ops (fcn-fast bench --help)", add_help=False)
    return parser


def _bench(argv: List[str]) -> int:
    try:
        from fcn_fast import bench
    except ImportError as exc:
        raise UserError(f"the benchmarks are not available in this installation ({exc})") from None
    return int(bench.main(argv) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command == "bench":
            return _bench(argv[1:])
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as exc:
        print(f"fcn-fast {command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an output folder that cannot be written
        print(f"fcn-fast {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fcn-fast {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
