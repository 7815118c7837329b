#!/usr/bin/env bash
# Expert parallelism across hosts: 2 hosts x 2 ranks in network namespaces (netns_hosts.sh),
# OpenMPI over TCP only.
#   multihost_test.sh DIST_TEST SWITCHYARD
# 1. The expert-parallel test program (layer and training equal to one process within 1e-4,
#    resume across rank counts) on the 4 ranks; its traffic is counted on host 1's interface.
# 2. A rank on host 1 killed (SIGKILL) or stopped (SIGSTOP) mid-run: the job ends within the
#    communication timeout and the last checkpoint loads.
# 3. SIGTERM to a rank on host 1: every rank stops at the same step, one final checkpoint,
#    exit 0; one process then resumes it.
# Exits 77 (ctest: skipped) where network namespaces cannot be made.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dist_test=$1
bin=$2
prefix=sy$$
hosts="$here/netns_hosts.sh"
dir=$(mktemp -d)
cleanup() {
  # Ranks left on a host (a stopped one) go with it.
  for ns in ${prefix}_h0 ${prefix}_h1; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -CONT "$p" 2>/dev/null; kill -9 "$p" 2>/dev/null; done
  done
  bash "$hosts" down $prefix
  rm -rf "$dir"
}
bash "$hosts" up $prefix 2 || exit $?
trap cleanup EXIT
fail() { echo "FAIL: $*"; [[ -f $dir/log ]] && tr '\r' '\n' <"$dir/log" | grep -v '^step' | tail -n 15; exit 1; }
export OMP_NUM_THREADS=1
timeout_s=5

if ip -br addr | grep -q '10\.211\.0\.'; then fail "the root namespace has a 10.211.0.x address"; fi
bytes() { ip netns exec ${prefix}_h1 cat /sys/class/net/eth0/statistics/"$1"_bytes; }

echo "== 1. expert-parallel tests on 2 hosts x 2 ranks over TCP"
rx0=$(bytes rx); tx0=$(bytes tx)
timeout 600 bash "$hosts" mpirun $prefix 2 -np 4 -x OMP_NUM_THREADS "$dist_test" >"$dir/log" 2>&1
rc=$?
grep -E '^\S*\[ *(OK|FAILED|PASSED) *\]' "$dir/log" | sed 's/\x1b\[[0-9;]*m//g' | tail -n 14
[[ $rc -eq 0 ]] || fail "dist_test across hosts: exit status $rc"
echo "host 1 sent $(( ($(bytes tx) - tx0) / 1024 )) KiB and received $(( ($(bytes rx) - rx0) / 1024 )) KiB"
(( $(bytes tx) - tx0 > 100000 )) || fail "hardly any traffic crossed between the hosts"

train=(train --expert-parallel 4 --comm-timeout $timeout_s --threads 1 --steps 100000
       --set model.d_model=32 --set model.context=32 --set model.moe.d_ff=48
       --set model.n_layers=2 --set train.batch=4 --set train.eval_interval=100000)
# Starts training across the hosts in the background; waits for the checkpoint file (or, with
# a huge interval, for progress lines); sets launcher and victim (a rank on host 1).
start() {
  local interval=$1
  rm -rf "$dir/run"
  bash "$hosts" mpirun $prefix 2 -np 4 -x OMP_NUM_THREADS "$bin" "${train[@]}" --out "$dir/run" \
    --set train.checkpoint_interval=$interval >"$dir/log" 2>&1 </dev/null &
  launcher=$!
  for _ in $(seq 1 600); do
    if ((interval < 1000)); then [[ -f $dir/run/checkpoint/index.json ]] && break
    else grep -q 'step *[0-9]*/100000' "$dir/log" 2>/dev/null && break; fi
    sleep 0.1
  done
  sleep 0.5
  victim=""
  for p in $(ip netns pids ${prefix}_h1); do
    [[ $(cat /proc/$p/comm 2>/dev/null) == switchyard ]] && victim=$p
  done
  [[ -n $victim ]] || { kill -9 $launcher; fail "no rank found on host 1"; }
}
wait_end() {
  local limit=$1
  for _ in $(seq 1 $((limit * 10))); do
    kill -0 $launcher 2>/dev/null || break
    sleep 0.1
  done
  kill -0 $launcher 2>/dev/null && { kill -9 $launcher; fail "the job still runs after $limit s"; }
  wait $launcher
}

for fault in KILL STOP; do
  echo "== 2. SIG$fault to a rank on host 1"
  start 5
  kill -$fault "$victim"
  t0=$(date +%s)
  wait_end $((timeout_s + 40))
  rc=$?
  kill -CONT "$victim" 2>/dev/null
  echo "job ended $(($(date +%s) - t0)) s after the fault, exit status $rc"
  [[ $rc -ne 0 ]] || fail "exit status 0 after SIG$fault"
  if [[ $fault == STOP ]]; then
    grep -q "did not complete within ${timeout_s} s" "$dir/log" || fail "no timeout message"
  fi
  "$bin" eval --checkpoint "$dir/run" --max-tokens 512 --threads 1 \
    >/dev/null || fail "the last checkpoint does not load"
done

echo "== 3. SIGTERM to a rank on host 1: a clean stop"
start 100000
kill -TERM "$victim"
wait_end 60
rc=$?
[[ $rc -eq 0 ]] || fail "exit status $rc after a clean stop"
said=$(tr '\r' '\n' <"$dir/log" | sed -n 's/^interrupted after step \([0-9]*\):.*/\1/p')
[[ -n $said ]] || fail "no 'interrupted after step' line"
[[ -f $dir/run/checkpoint/index.json ]] || fail "no final (sharded) checkpoint"
# --overlap auto: the expert group spans the hosts, so the exchange overlaps compute.
grep -q 'rows as f32, overlapped' "$dir/log" || fail "--overlap auto did not overlap across hosts"
"$bin" train --out "$dir/run" --resume --threads 1 --steps $((said + 2)) \
  --set model.d_model=32 --set model.context=32 --set model.moe.d_ff=48 --set model.n_layers=2 \
  --set train.batch=4 --set train.eval_interval=100000 --set train.checkpoint_interval=100000 \
  >"$dir/log" 2>&1 || fail "one process cannot resume the 4-rank checkpoint"
grep -q "done: $((said + 2)) steps" "$dir/log" || fail "resume did not reach step $((said + 2))"
echo "stopped after step $said on every rank; resumed by one process to step $((said + 2))"
echo "PASS"
