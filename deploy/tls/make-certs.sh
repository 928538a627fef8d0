#!/usr/bin/env bash
# Makes the certificates of a pg-watcher group with `pgwctl certs` (no OpenSSL needed):
# a CA, one certificate per member and one per operator. Run it on a trusted machine, copy
# ca.crt + <member>.crt + <member>.key to /etc/pg-watcher/tls/ on each member (key mode 0600,
# owned by the user pg-watcher runs as), give operators ca.crt + their own .crt/.key, and keep
# ca.key offline.
#
#   usage: make-certs.sh DIR MEMBER=HOST[,HOST...] ... [-- OPERATOR ...]
#   e.g.   make-certs.sh ./pki room-a=10.1.0.11 room-b=10.2.0.11 room-c=10.3.0.11 -- monitoring ops dba
#
# Each HOST is an address or DNS name operators reach that member by (pgwctl verifies it);
# members verify each other by member name. List each operator name in the members' [auth].
set -euo pipefail
PGWCTL=${PGWCTL:-pgwctl}
dir=${1:?usage: make-certs.sh DIR MEMBER=HOST[,HOST...] ... [-- OPERATOR ...]}
shift
[ -f "$dir/ca.crt" ] || "$PGWCTL" certs ca --dir "$dir"
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  member=${1%%=*}
  hosts=()
  if [ "$1" != "$member" ]; then
    IFS=, read -r -a list <<< "${1#*=}"
    for h in "${list[@]}"; do hosts+=(--host "$h"); done
  fi
  "$PGWCTL" certs member "$member" "${hosts[@]}" --dir "$dir"
  shift
done
[ $# -gt 0 ] && shift
for op in "$@"; do
  "$PGWCTL" certs client "$op" --dir "$dir"
done
