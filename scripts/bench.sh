#!/usr/bin/env bash
# Every benchmark, side by side with its baseline; figures go to BENCHMARKS.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
for module in bench_publisher bench_subscriber bench_dashboard bench_memory bench_archiver bench_cluster bench_push; do
  echo "== bench.$module"
  python -m "bench.$module"
done
