"""python -m fcn_fast.bench ...: the benchmark suite (see fcn_fast.bench)."""

import sys

from fcn_fast.bench import main

sys.exit(main(prog="python -m fcn_fast.bench"))
