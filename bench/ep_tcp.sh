#!/usr/bin/env bash
# The expert-parallel layer over TCP between two hosts (network namespaces, tests/dist/
# netns_hosts.sh) against shared memory on one host, same 4 ranks, same inputs; and the bytes
# host 1 puts on the wire per layer step against what the dispatch plan says it must send;
# each with the rows as f32 and bf16, the exchange in sequence with the experts and overlapped
# (--overlap: there "moving rows" is the exchange time not hidden behind compute).
#   bash bench/ep_tcp.sh [build/switchyard] [config]
# Wire bytes are TCP payload: the interface's tx bytes less 66 bytes of Ethernet, IPv4 and TCP
# (with timestamps) headers per packet. Two runs of 10 and 40 timed iterations are differenced,
# so start-up, the warm-up iteration and the daemons' own traffic cancel.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build/switchyard}
config=${2:-austen-moe}
prefix=sybench$$
hosts=tests/dist/netns_hosts.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
out=$(mktemp -d)
bash $hosts up $prefix 2
trap 'bash $hosts down $prefix; rm -rf "$out"' EXIT

payload() {  # TCP payload bytes host 1 has sent so far
  local b p
  b=$(ip netns exec ${prefix}_h1 cat /sys/class/net/eth0/statistics/tx_bytes)
  p=$(ip netns exec ${prefix}_h1 cat /sys/class/net/eth0/statistics/tx_packets)
  echo $((b - 66 * p))
}
for mode in f32 bf16 f32-overlap bf16-overlap; do
  x=${mode%-overlap}
  flags=(--exchange "$x" --split-wait --overlap off)
  [[ $mode == *-overlap ]] && flags[4]=on
  for iters in 10 40; do
    before=$(payload)
    bash $hosts mpirun $prefix 2 -np 4 -x OMP_NUM_THREADS "$bin" bench expert-parallel \
      --config "$config" --train-steps 0 --iters $iters "${flags[@]}" \
      --json "$out/tcp_${mode}_$iters.json" >/dev/null
    echo $(($(payload) - before)) >"$out/wire_${mode}_$iters"
  done
  OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_rmaps_base_oversubscribe=1 \
    mpirun -np 4 "$bin" bench expert-parallel --config "$config" --train-steps 0 --iters 40 \
    "${flags[@]}" --json "$out/shm_$mode.json" >/dev/null
done

python3 - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
cpu = open("/proc/cpuinfo").read().split("model name")[1].split(":")[1].split("\n")[0].strip()
first = json.load(open(f"{out}/tcp_f32_40.json"))
print(f"MoE layer of {first['config']}, 4 ranks x 1 thread, forward + backward ({cpu}, 2 cores):")
for x, width in (("f32", 4), ("bf16", 2), ("f32-overlap", 4), ("bf16-overlap", 2)):
    tcp = json.load(open(f"{out}/tcp_{x}_40.json"))
    shm = json.load(open(f"{out}/shm_{x}.json"))
    wire = {n: int(open(f"{out}/wire_{x}_{n}").read()) for n in (10, 40)}
    per_step = (wire[40] - wire[10]) / 30
    m = tcp["forward_values_sent"]
    host1, host0 = (2, 3), (0, 1)  # --map-by slot: ranks 0, 1 on host 0
    # Forward and backward each send these values, `width` bytes each.
    theory = 2 * width * sum(m[r][q] for r in host1 for q in host0)
    for name, j in ((f"{x} exchange, shared memory", shm), (f"{x} exchange, TCP 2 hosts", tcp)):
        s, e, w = j["layer_step_s"], j["layer_exchange_s"], j["layer_exchange_wait_s"]
        print(f"  {name:36s} step {1e3*s:7.2f} ms: compute {1e3*(s-e):6.2f} ms, "
              f"wait {1e3*w:6.2f} ms, moving rows {1e3*(e-w):6.2f} ms")
    print(f"  {x}: host 1 -> host 0 per layer step: {per_step/1024:.1f} KiB TCP payload measured, "
          f"{theory/1024:.1f} KiB from the dispatch plan ({per_step/theory:.4f} of it)")
EOF
