"""``python -m benchmarks run --suite NAME [--size ...] [--out ...] [--quick]``: see suites.py."""

from benchmarks.suites import main

main()
