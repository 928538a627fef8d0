#!/usr/bin/env bash
# Builds the Debian package target/debian/pg-watcher_<version>-1_<arch>.deb with cargo-deb
# (`cargo install cargo-deb --locked --no-default-features`): both binaries, the systemd unit,
# the example configs under /usr/share/doc/pg-watcher/examples, man pages and shell
# completions generated from the programs' own clap definitions.
#   usage: deploy/deb/build.sh [--profile release|dev] [cargo-deb options, e.g. --fast]
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=release
if [ "${1:-}" = "--profile" ]; then
  profile=${2:?--profile needs a name}
  shift 2
fi
cargo build --locked --profile "$profile" --bin pg-watcher --bin pgwctl
dir=target/$([ "$profile" = dev ] && echo debug || echo "$profile")
rm -rf target/pgw-docs
"$dir/pgwctl" gen-docs --out target/pgw-docs >/dev/null
gzip -9n target/pgw-docs/man/*.[18]
cargo deb --no-build --no-strip --profile "$profile" --locked "$@"
