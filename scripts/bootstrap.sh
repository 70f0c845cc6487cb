#!/usr/bin/env bash
# Installs what building and testing whisker-sync needs, from Debian's
# packages. Idempotent: installs only what is missing, so it is cheap to run
# before every build.
set -euo pipefail

packages=(
  # Interpreters and headers/libraries for each Lua flavour.
  lua5.4 liblua5.4-dev
  lua5.1 liblua5.1-0-dev
  luajit libluajit-5.1-dev
  # Test runner, JSON, TLS and sockets for every flavour (the old specs need
  # cjson and lua-sec), the linter and LuaRocks.
  lua-busted lua-cjson lua-sec lua-socket lua-filesystem lua-check luarocks
  # The reference server's PostgreSQL backend is tested against a real server.
  postgresql
  pkg-config
)

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    sudo=()
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    echo "bootstrap: need root (or passwordless sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "bootstrap: cargo not found; install the Rust toolchain (rustup) first" >&2
  exit 1
fi
