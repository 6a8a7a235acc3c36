#!/usr/bin/env bash
# Fuzzes every kms-server target for SECONDS each (default 600), starting from the seeds
# and the committed corpus, then minimizes the corpus back into corpus/<target> (which CI
# replays on stable: kms-server/tests/fuzz_corpus.rs). Needs the nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz`). Crashes land in artifacts/<target>/.
#
# Usage: bash kms-server/fuzz/run.sh [SECONDS] [targets...]
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=${*:-wrapped_dek request_json config pem_crl client_cert unseal_share kmip}
for t in $targets; do
  mkdir -p "corpus/$t" "work/$t"
  echo "== $t: ${secs}s" >&2
  cargo +nightly fuzz run "$t" "work/$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 2>&1 \
    | grep -E "^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==ERROR|SUMMARY)" || true
  # Keep the corpus small: only inputs that add coverage.
  rm -rf "corpus/$t.min" && mkdir -p "corpus/$t.min"
  cargo +nightly fuzz run "$t" "corpus/$t.min" "work/$t" "corpus/$t" -- -merge=1 >/dev/null 2>&1
  rm -rf "corpus/$t" "work/$t" && mv "corpus/$t.min" "corpus/$t"
  echo "$t: corpus $(ls "corpus/$t" | wc -l) inputs" >&2
done
