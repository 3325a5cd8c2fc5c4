"""Run the CLI in this process and print its peak RSS (KiB) on the last stderr line."""

import resource
import sys

from sidecar.cli import main

code = main(sys.argv[1:])
print(f"peak_rss_kib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
sys.exit(code)
