#!/usr/bin/env bash
# The fuzzing campaign behind the README's figures: runs each cargo-fuzz target for a fixed
# time (seconds, given as TARGET=SECONDS arguments; default below) from the seeds of
# make_seeds plus what earlier runs added to corpus/, and prints one line per target:
# executions, executions per second, coverage (libFuzzer's `cov`, edges; `ft`, features),
# corpus size and crashes (files in artifacts/<target>/). Logs go to campaign-logs/ (not
# committed). Needs cargo-fuzz; only stable Rust here, hence RUSTC_BOOTSTRAP=1.
set -uo pipefail
cd "$(dirname "$0")"
[ -d corpus/shard_reader ] || cargo run --release --bin make_seeds
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(shard_reader=300 manifest=300 import_config=240 checkpoint=240 import_csv=360)
mkdir -p campaign-logs
printf '%-14s %8s %12s %10s %8s %8s %8s %8s\n' target seconds executions exec/s cov ft corpus crashes
for spec in "${targets[@]}"; do
  t=${spec%%=*} secs=${spec#*=}
  mkdir -p "corpus/$t" "artifacts/$t"
  RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" \
    -print_final_stats=1 -rss_limit_mb=4096 >"campaign-logs/$t.log" 2>&1
  log=campaign-logs/$t.log
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' <<<"$last" | grep -o '[0-9]*')
  ft=$(grep -o 'ft: [0-9]*' <<<"$last" | grep -o '[0-9]*')
  corp=$(ls "corpus/$t" | wc -l)
  crashes=$(ls "artifacts/$t" 2>/dev/null | wc -l)
  printf '%-14s %8s %12s %10s %8s %8s %8s %8s\n' "$t" "$secs" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$corp" "$crashes"
done
