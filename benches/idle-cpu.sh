#!/usr/bin/env bash
# Idle CPU of each watcher of a running demo: `pgwctl demo up` (three rooms with PostgreSQL and
# pgpool), settle 10 s, then utime+stime of every pg-watcher from /proc over SECS seconds, as %
# of one core; then `demo down`. Prints one line per member and a JSON line at the end.
#   usage: benches/idle-cpu.sh [PGWCTL] [SECS]   (default: target/release/pgwctl, 60)
set -euo pipefail
pgwctl=${1:-target/release/pgwctl}
secs=${2:-60}
dir=$(mktemp -d /tmp/pgw-idle-XXXXXX)
chmod 755 "$dir"
trap '"$pgwctl" demo down --dir "$dir" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
"$pgwctl" demo up --dir "$dir" >/dev/null
sleep 10
mapfile -t members < <(python3 -c "import json,sys; [print(m['name'], m['pid']) for m in json.load(open(sys.argv[1]))['members']]" "$dir/demo.json")
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A before
for m in "${members[@]}"; do set -- $m; before[$1]=$(ticks "$2"); done
sleep "$secs"
json="{"
for m in "${members[@]}"; do
  set -- $m
  pct=$(python3 -c "print(round(($(ticks "$2") - ${before[$1]}) / $(getconf CLK_TCK) / $secs * 100, 2))")
  echo "$1 idle CPU: $pct % of one core"
  json+="\"$1\":$pct,"
done
echo "${json%,}}"
