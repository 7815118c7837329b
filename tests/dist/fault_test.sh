#!/usr/bin/env bash
# A rank of a 2-rank expert-parallel run stops answering (SIGSTOP) or dies (SIGKILL) after the
# first checkpoint: the job must end within a bounded time with an error that says so, and the
# checkpoint must still load and evaluate.
#   fault_test.sh <switchyard binary> stop|kill
set -uo pipefail
bin=$1
mode=$2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
timeout_s=5

mpirun -np 2 "$bin" train --expert-parallel 2 --comm-timeout "$timeout_s" --out "$dir/run" \
  --steps 100000 --set model.d_model=32 --set model.context=32 --set model.moe.d_ff=48 \
  --set model.n_layers=2 --set train.batch=4 --set train.checkpoint_interval=5 \
  --set train.eval_interval=100000 >"$dir/log" 2>&1 &
launcher=$!

for _ in $(seq 1 600); do
  [[ -f $dir/run/checkpoint/index.json ]] && break
  sleep 0.1
done
if [[ ! -f $dir/run/checkpoint/index.json ]]; then
  echo "FAIL: no checkpoint within 60 s"; cat "$dir/log"; kill -9 $launcher; exit 1
fi
sleep 0.5
# The ranks are the launcher's children; the last started is rank 1 (rank 0 writes checkpoints).
victim=$(pgrep -P $launcher | tail -n 1)
if [[ -z $victim ]]; then echo "FAIL: no rank process found"; cat "$dir/log"; exit 1; fi
if [[ $mode == stop ]]; then kill -STOP "$victim"; else kill -KILL "$victim"; fi
t0=$(date +%s)
# Bounded: the timeout plus the watchdog's granularity and mpirun's teardown.
limit=$((timeout_s + 30))
for _ in $(seq 1 $((limit * 10))); do
  kill -0 $launcher 2>/dev/null || break
  sleep 0.1
done
elapsed=$(($(date +%s) - t0))
if kill -0 $launcher 2>/dev/null; then
  echo "FAIL: the job still runs ${elapsed} s after rank 1 was sent SIG${mode^^}"
  kill -CONT "$victim" 2>/dev/null; kill -9 $launcher "$victim" 2>/dev/null; exit 1
fi
wait $launcher
rc=$?
kill -CONT "$victim" 2>/dev/null; kill -9 "$victim" 2>/dev/null
echo "job ended ${elapsed} s after the fault, exit status $rc"
tail -n 5 "$dir/log"
if [[ $rc -eq 0 ]]; then echo "FAIL: exit status 0 after a fault"; exit 1; fi
if [[ $mode == stop ]] && ! grep -q "did not complete within ${timeout_s} s" "$dir/log"; then
  echo "FAIL: no timeout message"; exit 1
fi
"$bin" eval --checkpoint "$dir/run" --max-tokens 2048 || {
  echo "FAIL: the last checkpoint does not load"; exit 1; }
echo "PASS"
