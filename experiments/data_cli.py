"""``halp data``: data sets the suite can make offline.

A plugin of the ``halp`` command line (entry point group ``halp.commands``): the generators read
the suite's loaders, so they belong to the suite."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = """Make data sets offline.

  make-fashiondet OUT   a PASCAL-VOC-layout detection set from Fashion-MNIST (Debian's
                        dataset-fashion-mnist): 1-4 items per canvas on a textured background,
                        tight boxes, 10 classes. Train canvases use Fashion-MNIST's train split,
                        test canvases its test split; fixed seeds. Written atomically.

example:
  halp data make-fashiondet data/fashiondet
  halp-run experiment=fashiondet_ssd"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make data sets offline (Fashion-Det, a VOC-layout detection set)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    m = cmds.add_parser("make-fashiondet", help="write the Fashion-Det detection set (VOC layout)",
                        description="Write Fashion-Det (VOC layout) to OUT; see `halp data --help`.")
    m.add_argument("out", type=Path, metavar="OUT", help="output folder (a VOCdevkit: VOC2007/..., classes.txt)")
    m.add_argument("--train", type=int, default=6000, help="training canvases (default 6000)")
    m.add_argument("--test", type=int, default=1000, help="test canvases (default 1000)")
    m.add_argument("--size", type=int, default=128, help="canvas side in pixels (default 128)")
    m.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    m.add_argument("--fashion-root", default=None, help="Fashion-MNIST folder (default Debian's)")
    m.add_argument("--force", action="store_true", help="replace OUT if it exists")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=_make_fashiondet)


def _make_fashiondet(args: argparse.Namespace) -> int:
    from halp.cli import UserError

    from .fashiondet import make_fashiondet

    try:
        out = make_fashiondet(args.out, args.train, args.test, args.size, args.seed, args.fashion_root,
                              progress=not args.no_progress, force=args.force)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    print(f"wrote {out} ({args.train} train + {args.test} test canvases)")
    return 0
