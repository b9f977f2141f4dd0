#!/usr/bin/env bash
# Back-to-back measurement of two installs, alternating (A B, B A, A B): the figures of
# docs/architecture.md's "Measured at the end of ..." tables. Not a test.
#
#   tests/bench_pairs.sh BEFORE_DIR AFTER_DIR OUT_DIR
#
# Each DIR is a checkout with its own .venv holding that checkout installed with the bench
# extra (`git worktree add --detach DIR COMMIT && cd DIR && python3 -m venv .venv &&
# .venv/bin/pip install '.[bench]'`). Runs from /tmp so that neither checkout is imported
# from the working directory; AFTER_DIR's copy of tests/cpu_per_cycle.py measures both.
set -euo pipefail
before=$(realpath "$1"); after=$(realpath "$2"); out=$(realpath -m "$3")
mkdir -p "$out"
export SESSIONLANE_TEST_TAG="bench-pairs-$$"
cpu="$after/tests/cpu_per_cycle.py"
for order in "before after" "after before" "before after"; do
  for side in $order; do
    dir=$before; [ "$side" = after ] && dir=$after
    n=$(find "$out" -name "$side-*.json" | wc -l); n=$((n + 1))
    echo "== $side $n $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/log"
    (cd /tmp && "$dir/.venv/bin/sessionlane" bench --suite handoff --suite turn --suite append \
      --duration 2 --json --out "$out/$side-$n.json" > "$out/$side-$n.txt" 2>&1)
    (cd /tmp && "$dir/.venv/bin/sessionlane" bench --suite scale --quick --json \
      --out "$out/scale-$side-$n.json" > /dev/null 2>&1)
    (cd /tmp && "$dir/.venv/bin/python" "$cpu" 300 8 one three >> "$out/cpu-$side.jsonl")
    # The fused cycle (an install from before the eighth session has none: skipped there).
    (cd /tmp && "$dir/.venv/bin/python" "$cpu" 300 8 one fused >> "$out/cpu-$side-fused.jsonl") \
      || echo "$side: no fused cycle" >> "$out/log"
    (cd /tmp && "$dir/.venv/bin/python" "$cpu" 300 8 each fused \
      >> "$out/cpu-$side-each-fused.jsonl") || echo "$side: no fused cycle" >> "$out/log"
    # CPU per pipelined record, file and client (one writer, 64 in flight).
    (cd /tmp && "$dir/.venv/bin/python" "$after/tests/append_cost.py" pipelined 30000 64 \
      >> "$out/append-$side.jsonl")
  done
done
