#!/bin/sh
# pg-watcher hook: point a host name at the new primary (the seed's hosts-file entries that
# clients use to reach "the" database), replacing the line in place and atomically.
#
#   [[hooks]]
#   name = "hosts-entry"
#   command = ["/usr/share/pg-watcher/hooks/hosts-entry.sh", "/etc/hosts", "global-pg-master",
#              "/etc/pg-watcher/hosts-map"]
#   clusters = ["global"]
#
# Argument 1: the hosts file. Argument 2: the host name to point. Argument 3: a map file with
# one `MEMBER ADDRESS` pair per line (the address of each member's server of this cluster).
set -eu
hosts=${1:?usage: hosts-entry.sh HOSTS_FILE NAME MAP_FILE}
name=${2:?host name missing}
map=${3:?map file missing}
member=${PGW_NEW_PRIMARY:?PGW_NEW_PRIMARY is not set (run by pg-watcher)}
addr=$(awk -v m="$member" '$1 == m { print $2; exit }' "$map")
if [ -z "$addr" ]; then
    echo "no address for $member in $map" >&2
    exit 1
fi
tmp="$hosts.pgw.$$"
# Every line but the one naming $name, then the new entry; same owner and mode as before.
awk -v n="$name" '{ for (i = 2; i <= NF; i++) if ($i == n) next; print }' "$hosts" > "$tmp"
printf '%s\t%s\n' "$addr" "$name" >> "$tmp"
chmod --reference="$hosts" "$tmp" 2>/dev/null || true
mv -f "$tmp" "$hosts"
echo "$name -> $addr ($member)"
