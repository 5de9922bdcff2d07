"""python -m examples.llama {train,compare} ... (each has --help)."""

import sys

from examples.llama import xla_flags

USAGE = "usage: python -m examples.llama {train,compare} [--help] ..."


def main(argv: list[str]) -> int:
  if not argv or argv[0] not in ("train", "compare"):
    print(USAGE, file=sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2
  xla_flags.set_defaults()  # before JAX creates its backend
  if argv[0] == "train":
    from examples.llama import train

    return train.main(argv[1:])
  from examples.llama import compare

  return compare.main(argv[1:])


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
