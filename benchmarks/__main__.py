"""python -m benchmarks ... from the repository root: the same as `fcn-fast bench ...` (see benchmarks/README.md)."""

import sys

from fcn_fast.bench import main

sys.exit(main(prog="python -m benchmarks"))
