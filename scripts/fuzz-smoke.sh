#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ briefly on stable Rust (no sanitizer), from
# its seeds: a decoder that panics, hangs or leaks on hostile input fails this.
# Usage: scripts/fuzz-smoke.sh [SECONDS_PER_TARGET]   (default 15)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-15}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
cargo fuzz build -s none
for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t"
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  echo "fuzz: $t for ${secs}s"
  cargo fuzz run -s none "$t" "corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=0 2>&1 | tail -n 2
  # cargo fuzz exits non-zero on a crash; pipefail carries it out.
done
