"""grood-convert: PyTorch weights -> a grood_jax checkpoint directory (`grood_jax.convert`).

  grood-convert --from openood-resnet18-32 --weights best.ckpt --out runs/r18 --benchmark cifar10
  (also: python -m grood_jax.cli.convert ..., or python -m grood_jax.convert ...)
"""

from __future__ import annotations

import argparse
import sys

from grood_jax.cli.common import Parser, run_cli
from grood_jax.convert import ARCHS, __doc__ as _CONVERT_DOC, convert
from grood_jax.errors import ConversionError



def parse_args(argv=None):
  p = Parser(prog="grood-convert", description=_CONVERT_DOC,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--from", dest="arch", required=True, choices=sorted(ARCHS),
                 help="architecture and key layout of the weights")
  p.add_argument("--weights", required=True, help=".pth/.ckpt (needs torch), .npz or .safetensors")
  p.add_argument("--out", required=True, help="checkpoint directory to create (score.py --ckpt)")
  p.add_argument("--benchmark", required=True,
                 help="benchmark the model was trained for: cifar10, cifar100, imagenet200, "
                      "imagenet1k, or any registered name")
  p.add_argument("--num-classes", type=int, help="class count (default: the benchmark's, or "
                 "fc.weight's rows for other benchmarks)")
  p.add_argument("--image-size", type=int, help="input size recorded in the config (default: "
                 "the benchmark's)")
  p.add_argument("--debug", action="store_true", help="show tracebacks")
  return p.parse_args(argv)


def main(argv=None) -> int:
  try:
    args = parse_args(argv)
  except SystemExit as e:        # --help (0) or a bad command line (2), already printed
    return e.code if isinstance(e.code, int) else 0

  def work() -> int:
    try:
      model = convert(args.weights, args.arch, args.out, args.benchmark,
                      num_classes=args.num_classes, image_size=args.image_size)
    except OSError as e:
      raise ConversionError(f"--weights {args.weights}: {e}") from e
    print(f"wrote {args.out}: {ARCHS[args.arch][0]}, {model.num_classes} classes, benchmark "
          f"{args.benchmark}; score it with: grood-score --ckpt {args.out}")
    return 0

  return run_cli(work, debug=args.debug)


def entry() -> None:
  """Console-script entry point (`grood-convert`)."""
  sys.exit(main())


if __name__ == "__main__":
  entry()
