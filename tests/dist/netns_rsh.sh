#!/usr/bin/env bash
# mpirun's remote launcher (plm_rsh_agent) for the hosts of netns_hosts.sh: called as ssh would
# be, `netns_rsh.sh [options] HOST COMMAND...`, it runs COMMAND in HOST's namespace instead.
# HOST is 10.211.0.K, the namespace ${SY_NETNS_PREFIX}_h{K-1}.
set -euo pipefail
while [[ ${1:-} == -* ]]; do shift; done
host=$1
shift
octet=${host##*.}
if [[ -z ${SY_NETNS_PREFIX:-} || ! $host =~ ^10\.211\.0\.[0-9]+$ ]]; then
  echo "netns_rsh.sh: host '$host' is not one of netns_hosts.sh's (10.211.0.K, with SY_NETNS_PREFIX set)" >&2
  exit 255
fi
exec ip netns exec "${SY_NETNS_PREFIX}_h$((octet - 1))" sh -c "$*"
