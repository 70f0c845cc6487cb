#!/usr/bin/env bash
# Large stories and assets: a 500-passage story and 50 MB assets (text that
# compresses, random bytes that do not, like images and audio), bytes on the
# wire and time, with compression on and off, and the peak memory (VmHWM) of
# the client process and of the server process for each case. Release
# builds; every case gets a fresh server and a fresh client process.
#
#   bench/run-assets.sh            (ASSET_MB=50 by default)
#
# Cargo's target directory is CARGO_TARGET_DIR when set, else target/.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
mb=${ASSET_MB:-50}
cargo build --release -q -p sync-server --target-dir "$target"
cargo build --release -q -p whisker-sync --no-default-features --features lua54 --target-dir "$target"
server_bin=$target/release/whisker-sync-server

work=$(mktemp -d)
pid=
stop_server() {
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
  fi
}
trap 'stop_server; rm -rf "$work"' EXIT
mkdir -p "$work/cpath"
cp "$target/release/libwhisker_sync.so" "$work/cpath/whisker_sync.so"

# The assets: random bytes, and prose-like text (repeating a 1 MB block of
# varied sentences, as a long uncompressed text or data file would).
head -c "$((mb * 1024 * 1024))" /dev/urandom >"$work/media-${mb}MB.bin"
awk 'BEGIN { srand(7); split("the lantern corridor rain door opened slowly beyond staircase wound dark water dripped old stone listened footsteps breath cold salt iron letters map marked red ink", w, " ");
  while (n < 1048576) { line = ""; for (i = 0; i < 12; i++) line = line w[int(rand() * 25) + 1] " "; print line; n += length(line) + 1 } }' \
  >"$work/block"
for _ in $(seq "$mb"); do cat "$work/block"; done | head -c "$((mb * 1024 * 1024))" >"$work/text-${mb}MB.txt"

hwm() { sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$1/status"; }

# run CASE COMPRESSION [FILE]: fresh server, one client process; prints the
# client's lines with the server's peak memory appended.
run() {
  local dir=$work/server-$1-$2
  mkdir -p "$dir"
  local key=bench-assets-key-0123456789
  "$server_bin" keys add --key "$key" --db "$dir/sync.db" >/dev/null
  "$server_bin" serve --db "$dir/sync.db" --listen 127.0.0.1:0 --max-blob-bytes 1073741824 \
    >"$dir/banner" 2>"$dir/log" &
  pid=$!
  for _ in $(seq 200); do
    grep -q listening "$dir/banner" 2>/dev/null && break
    sleep 0.05
  done
  local url
  url=$(sed -n 's/^listening on //p' "$dir/banner")
  LUA_PATH="$root/lua/?.lua;;" LUA_CPATH="$work/cpath/?.so;;" \
    lua5.4 bench/assets.lua "$1" "$url" "$key" "$2" "$work" "${3:-}" >"$dir/client" 2>>"$work/notes"
  local server_peak
  server_peak=$(hwm "$pid")
  stop_server
  awk -F'\t' -v s="$server_peak" '{ print $0 "\t" s }' "$dir/client"
  rm -rf "$dir"
}

{
  run idle on
  for c in on off; do
    run story "$c"
    run asset "$c" "$work/text-${mb}MB.txt"
    run asset "$c" "$work/media-${mb}MB.bin"
  done
} >"$work/results"

sort -u "$work/notes"
printf '%-42s %-5s %10s %13s %13s %12s %12s\n' case gzip ms sent received "client KiB" "server KiB"
awk -F'\t' '{ printf "%-42s %-5s %10.1f %13d %13d %12d %12d\n", $1, $2, $3, $4, $5, $6, $7 }' "$work/results"
