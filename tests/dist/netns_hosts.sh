#!/usr/bin/env bash
# Several "hosts" on one machine: network namespaces PREFIX_h0 .. PREFIX_h{N-1}, each with one
# veth to a bridge in its own namespace PREFIX_sw, addresses 10.211.0.1 .. 10.211.0.N/24. The
# root namespace gets no interface and no address: the traffic between the hosts stays in
# namespaces this script made. mpirun runs in PREFIX_h0 and starts its daemons on the other
# hosts through netns_rsh.sh (in place of ssh), with OpenMPI's TCP transport only (btl tcp,self:
# no shared memory, even between two ranks of one host).
#
#   netns_hosts.sh up PREFIX N        create the hosts (root; exits 77 where namespaces cannot
#                                     be made, for ctest's skip)
#   netns_hosts.sh down PREFIX        remove them
#   netns_hosts.sh mpirun PREFIX SLOTS ARGS...
#                                     mpirun over every host with SLOTS ranks each
#   netns_hosts.sh exec PREFIX I CMD...   run CMD in host I
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cmd=$1
prefix=$2
subnet=10.211.0

hosts_of() { ip netns list | sed -n "s/^\(${prefix}_h[0-9]*\).*/\1/p" | sort -V; }

case $cmd in
  up)
    n=$3
    if [[ $(id -u) -ne 0 ]] || ! ip netns add "${prefix}_sw" 2>/dev/null; then
      echo "SKIP: cannot create network namespaces here (needs root and iproute2)"
      exit 77
    fi
    ip -n "${prefix}_sw" link add br0 type bridge
    ip -n "${prefix}_sw" link set br0 up
    for ((i = 0; i < n; ++i)); do
      ns=${prefix}_h$i
      ip netns add "$ns"
      ip link add eth0 netns "$ns" type veth peer name p$i netns "${prefix}_sw"
      ip -n "${prefix}_sw" link set p$i master br0
      ip -n "${prefix}_sw" link set p$i up
      ip -n "$ns" addr add "$subnet.$((i + 1))/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
    done
    ;;
  down)
    for ns in $(hosts_of) "${prefix}_sw"; do ip netns del "$ns" 2>/dev/null || true; done
    ;;
  mpirun)
    slots=$3
    shift 3
    list=""
    for ns in $(hosts_of); do
      i=${ns##*_h}
      list+="${list:+,}$subnet.$((i + 1)):$slots"
    done
    export SY_NETNS_PREFIX=$prefix
    exec ip netns exec "${prefix}_h0" mpirun --host "$list" \
      --mca plm_rsh_agent "$here/netns_rsh.sh" \
      --mca btl tcp,self --mca btl_tcp_if_include "$subnet.0/24" \
      --mca oob_tcp_if_include "$subnet.0/24" "$@"
    ;;
  exec)
    i=$3
    shift 3
    exec ip netns exec "${prefix}_h$i" "$@"
    ;;
  *)
    echo "usage: netns_hosts.sh up|down|mpirun|exec PREFIX ..." >&2
    exit 2
    ;;
esac
