#!/bin/sh
# pg-watcher hook: publish the group's active room where other services read it (the seed's
# `ks_master_zone`). Runs on `active_room_changed` (and is harmless on `primary_changed`).
#
#   [[hooks]]
#   name = "active-room"
#   command = ["/usr/share/pg-watcher/hooks/active-room.sh", "/var/lib/pg-watcher/active-room"]
#   on = ["active_room_changed"]
#
# Argument 1: a file that receives the room name (replaced atomically).
# Argument 2 (optional): host:port of a memcached that receives `set KEY` (KEY: argument 3,
# default ks_master_zone), as the seed's services read it from memcached.
set -eu
file=${1:?usage: active-room.sh FILE [MEMCACHED_HOST:PORT [KEY]]}
room=${PGW_ACTIVE_ROOM:?PGW_ACTIVE_ROOM is not set (run by pg-watcher)}
tmp="$file.tmp.$$"
printf '%s\n' "$room" > "$tmp"
mv -f "$tmp" "$file"
if [ -n "${2:-}" ]; then
    key=${3:-ks_master_zone}
    host=${2%:*}
    port=${2##*:}
    # memcached text protocol: set <key> <flags> <exptime> <bytes>, then the value.
    reply=$(printf 'set %s 0 0 %s\r\n%s\r\nquit\r\n' "$key" "${#room}" "$room" | timeout 5 bash -c "exec 3<>/dev/tcp/$host/$port; cat >&3; cat <&3" | head -n 1 | tr -d '\r')
    if [ "$reply" != "STORED" ]; then
        echo "memcached $2 answered '$reply' to set $key" >&2
        exit 1
    fi
fi
echo "active room is $room"
