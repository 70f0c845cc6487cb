#!/usr/bin/env bash
# Runs whisker-core's own sync specs, unchanged, against this checkout: our
# lua/ modules and native module first on the path, whisker-core's lib/ after
# (so modules we do not ship natively still load from whisker-core).
#
#   WHISKER_CORE=/path/to/whisker-core scripts/conformance.sh [flavour...]
#
# Prints a table per spec file and flavour and ends with "conformance: N
# passed, N failed" counting the spec files of modules we ship. Exits non-zero
# when one of those fails on any flavour.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${WHISKER_CORE:-}" ]; then
  echo "conformance: skipped (set WHISKER_CORE to a whisker-core checkout to run its sync specs)"
  exit 0
fi
core=$(cd "$WHISKER_CORE" && pwd) || exit 1
busted=$(command -v busted) || { echo "conformance: busted not found" >&2; exit 1; }
flavours=("$@")
((${#flavours[@]})) || flavours=(lua5.4 lua5.1 luajit)

# spec file (in whisker-core) and the module of ours it exercises
specs=(
  "tests/storage/sync/protocol_spec.lua whisker/storage/sync/protocol.lua"
  "tests/storage/sync/engine_spec.lua whisker/storage/sync/engine.lua"
  "tests/storage/sync/state_manager_spec.lua whisker/storage/sync/state_manager.lua"
  "tests/storage/sync/transports/http_spec.lua whisker/storage/sync/transports/http.lua"
  "tests/storage/sync/transports/websocket_spec.lua whisker/storage/sync/transports/websocket.lua"
  "tests/cli/commands/sync_spec.lua whisker/cli/commands/sync.lua"
  "tests/integration/sync_integration_spec.lua whisker/storage/sync/engine.lua"
)

for flavour in "${flavours[@]}"; do
  [ -f "$root/build/$flavour/whisker_sync.so" ] || make -s -C "$root" "build-$flavour" || exit 1
done

passed=0 failed=0 broken=0
printf '%-44s' "spec file"
for flavour in "${flavours[@]}"; do printf '%-22s' "$flavour"; done
echo
for entry in "${specs[@]}"; do
  read -r spec module <<<"$entry"
  native=0
  [ -f "$root/lua/$module" ] && native=1
  label="${spec#tests/}"
  ((native)) || label="$label (old module)"
  printf '%-44s' "$label"
  for flavour in "${flavours[@]}"; do
    log=$(cd "$core" && "$flavour" "$busted" -o plainTerminal \
      --lpath="$root/lua/?.lua;$root/lua/?/init.lua;lib/?.lua;lib/?/init.lua" \
      --cpath="$root/build/$flavour/?.so" "$spec" 2>&1)
    summary=$(grep -Eo '[0-9]+ success(es)? / [0-9]+ failures? / [0-9]+ errors? / [0-9]+ pending' <<<"$log" | tail -1)
    if [ -z "$summary" ]; then
      ok=0 fail=0 err=1 pend=0
    else
      read -r ok _ _ fail _ _ err _ _ pend _ <<<"$summary"
    fi
    if ((fail + err)); then
      cell="$ok ok, $fail fail, $err err"
    else
      cell="$ok ok"
    fi
    ((pend)) && cell="$cell, $pend pending"
    printf '%-22s' "$cell"
    if ((native)); then
      passed=$((passed + ok))
      failed=$((failed + fail + err))
      if ((fail + err)); then
        broken=1
        failures+=$'\n'"--- $spec on $flavour ---"$'\n'"$log"
      fi
    fi
  done
  echo
done
if ((broken)); then
  echo "${failures:-}" | tail -n 200
fi
echo "conformance: $passed passed, $failed failed"
exit "$broken"
