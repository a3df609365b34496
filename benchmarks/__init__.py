"""The benchmark suite's repository entry point; its code is fcn_fast.bench (installed with the package)."""
