#!/bin/sh
# pg-watcher hook: reload HAProxy after a change of primary, so that it re-resolves its servers
# and drops connections to the old primary at once instead of at its next health check.
#
#   [[hooks]]
#   name = "haproxy-reload"
#   command = ["/usr/share/pg-watcher/hooks/haproxy-reload.sh", "/run/haproxy.pid"]
#
# Argument 1 (optional): HAProxy's pid file; the master process is sent SIGUSR2 (a graceful
# reload in master-worker mode). Without it: `systemctl reload haproxy`.
set -eu
if [ -n "${1:-}" ]; then
    pid=$(head -n 1 "$1")
    kill -USR2 "$pid"
    echo "haproxy $pid reloaded for $PGW_CLUSTER primary $PGW_NEW_PRIMARY"
else
    systemctl reload haproxy
    echo "haproxy reloaded for $PGW_CLUSTER primary $PGW_NEW_PRIMARY"
fi
