#!/usr/bin/env bash
# Clean stops of a training run: a signal makes every rank stop at the same step boundary,
# write a final checkpoint holding that step and exit 0; a second signal ends it at once. The
# checkpoint then loads and --resume continues from it.
#   clean_stop_test.sh <switchyard binary> MODE
# MODE: single       SIGTERM to a one-process run
#       rank_term    SIGTERM to rank 1 of a 2-rank expert-parallel run under mpirun
#       mpirun_usr1  SIGUSR1 to mpirun (OpenMPI forwards it to every rank at once)
#       mpirun_term  SIGTERM to mpirun: OpenMPI sends the ranks SIGTERM after
#                    odls_base_sigkill_timeout s (set to 5 here) and SIGKILL as long after;
#                    the ranks stop cleanly in between; mpirun itself then exits 1
#       second       two SIGTERMs to rank 1, the second while it waits for rank 0 (held by
#                    SIGSTOP, so the first cannot finish its step): rank 1 ends at once, the
#                    job ends with an error, and the last periodic checkpoint still loads
set -uo pipefail
bin=$1
mode=$2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
stored_step() {  # the later step of the run's checkpoints (a file and/or a sharded directory)
  python3 -c 'import json,os,struct,sys
run=sys.argv[1]; steps=[]
f=os.path.join(run,"checkpoint.safetensors"); i=os.path.join(run,"checkpoint","index.json")
if os.path.exists(f):
    b=open(f,"rb").read(); n=struct.unpack("<Q",b[:8])[0]
    steps.append(int(json.loads(b[8:8+n])["__metadata__"]["step"]))
if os.path.exists(i): steps.append(int(json.load(open(i))["step"]))
print(max(steps))' "$1"
}
have_checkpoint() { [[ -f $1/checkpoint.safetensors || -f $1/checkpoint/index.json ]]; }
fail() { echo "FAIL: $*"; tr '\r' '\n' <"$dir/log" | grep -v '^step' | tail -n 20; exit 1; }

# Only `second` writes periodic checkpoints (every 50 steps): elsewhere a checkpoint exists
# only if the stop was clean.
interval=100000
[[ $mode == second ]] && interval=50
common=(train --out "$dir/run" --threads 1 --set model.d_model=32 --set model.context=32
        --set model.moe.d_ff=48 --set model.n_layers=2 --set train.batch=4
        --set train.checkpoint_interval=$interval --set train.eval_interval=100000)
args=("${common[@]}" --steps 100000)
[[ $mode == mpirun_term ]] && export OMPI_MCA_odls_base_sigkill_timeout=5
if [[ $mode == single ]]; then
  "$bin" "${args[@]}" >"$dir/log" 2>&1 </dev/null &
else
  mpirun -np 2 "$bin" "${args[@]}" --expert-parallel 2 --comm-timeout 5 >"$dir/log" 2>&1 \
    </dev/null &
fi
launcher=$!

# Training under way (for `second`: past its first periodic checkpoint, to fall back on).
running() {
  if [[ $mode == second ]]; then have_checkpoint "$dir/run"
  else grep -q 'step *[0-9]*/100000' "$dir/log" 2>/dev/null; fi
}
for _ in $(seq 1 600); do
  running && break
  sleep 0.1
done
running || { kill -9 $launcher; fail "not training within 60 s"; }
sleep 0.5
rank0=$(pgrep -P $launcher | head -n 1)
rank1=$(pgrep -P $launcher | tail -n 1)
case $mode in
  single) kill -TERM $launcher ;;
  rank_term) kill -TERM "$rank1" ;;
  mpirun_usr1) kill -USR1 $launcher ;;
  mpirun_term) kill -TERM $launcher ;;
  second)
    kill -STOP "$rank0"; kill -TERM "$rank1"; sleep 0.5
    kill -TERM "$rank1"; sleep 0.5; kill -CONT "$rank0" ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
t0=$(date +%s)
for _ in $(seq 1 900); do
  kill -0 $launcher 2>/dev/null || break
  sleep 0.1
done
kill -0 $launcher 2>/dev/null && { kill -9 $launcher; fail "still running 90 s after the signal"; }
wait $launcher
rc=$?
echo "ended $(($(date +%s) - t0)) s after the signal, exit status $rc"

have_checkpoint "$dir/run" || fail "no final checkpoint"
step=$(stored_step "$dir/run") || fail "checkpoint unreadable"
said=$(tr '\r' '\n' <"$dir/log" | sed -n 's/^interrupted after step \([0-9]*\):.*/\1/p')
if [[ $mode == second ]]; then
  [[ $rc -ne 0 ]] || fail "exit status 0 after a second signal"
  [[ -z $said ]] || fail "a second signal still stopped cleanly"
  [[ $((step % 50)) -eq 0 ]] || fail "checkpoint step $step is not a periodic one"
else
  expect_rc=0
  [[ $mode == mpirun_term ]] && expect_rc=1  # mpirun's own status after it was signalled
  [[ $rc -eq $expect_rc ]] || fail "exit status $rc, expected $expect_rc"
  # mpirun_term: mpirun no longer relays the ranks' output by then; the checkpoint speaks.
  if [[ $mode != mpirun_term ]]; then
    [[ -n $said ]] || fail "no 'interrupted after step' line"
    [[ $said == "$step" ]] || fail "stopped after step $said but the checkpoint holds step $step"
  fi
fi
echo "checkpoint holds step $step"
if [[ $mode == rank_term ]]; then
  # --overlap auto: both ranks on this one host, so the exchange runs in sequence.
  grep -q 'rows as f32 ->' "$dir/log" || fail "--overlap auto overlapped on one host"
fi
"$bin" eval --checkpoint "$dir/run" --max-tokens 512 --threads 1 \
  >/dev/null || fail "the final checkpoint does not load"
# --resume continues from it: a few more steps.
"$bin" "${common[@]}" --steps $((step + 3)) --resume >"$dir/log" 2>&1 </dev/null ||
  fail "--resume from the stopped checkpoint failed"
step2=$(stored_step "$dir/run")
[[ $step2 -eq $((step + 3)) ]] || fail "resumed to step $step2, expected $((step + 3))"
echo "PASS"
