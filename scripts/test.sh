#!/usr/bin/env bash
# Runs every check and test of whisker-sync: formatting, lints, cargo tests
# (with the busted specs under mlua) for each Lua flavour, busted on each system
# interpreter, and whisker-core's specs when WHISKER_CORE is set. Ends with one
# line "N passed, N failed" and fails when anything failed.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
flavours=(lua5.4 lua5.1 luajit)
passed=0
failed=0
log=$(mktemp)
# The reliability tests (fault injection, crashes, fuzzing, load, security)
# append the figures they measure here; see docs/RELIABILITY.md.
figures=$(mktemp)
export WHISKER_RELIABILITY_REPORT=$figures
trap 'rm -f "$log" "$figures"' EXIT

feature_of() {
  case $1 in
    lua5.4) echo lua54 ;;
    lua5.1) echo lua51 ;;
    luajit) echo luajit ;;
  esac
}

# tally PASSED FAILED RC: adds counts; a failing command that reported no
# failed test (a build error, a crash) still counts as one failure.
tally() {
  local p=$1 f=$2 rc=$3
  if ((rc != 0 && f == 0)); then f=1; fi
  passed=$((passed + p))
  failed=$((failed + f))
  ((f == 0)) || echo "!!! failed: $step"
}

# A check that passes or fails as a whole.
check() {
  step=$1
  shift
  echo "==> $step"
  "$@"
  local rc=$?
  if ((rc == 0)); then tally 1 0 0; else tally 0 1 "$rc"; fi
}

# Runs a command and counts the tests it reports. $1 is the step name, $2 the
# output format (cargo or busted), the rest the command.
counted() {
  step=$1
  local format=$2
  shift 2
  echo "==> $step"
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]} counts
  case $format in
    cargo)
      counts=$(awk '/^test result:/ {
          for (i = 2; i <= NF; i++) {
            if ($i ~ /^passed;?$/) p += $(i - 1)
            if ($i ~ /^failed;?$/) f += $(i - 1)
          }
        } END { print p + 0, f + 0 }' "$log")
      ;;
    busted)
      counts=$(grep -Eo '[0-9]+ success(es)? / [0-9]+ failures? / [0-9]+ errors?' "$log" |
        awk '{ p += $1; f += $4 + $7 } END { print p + 0, f + 0 }')
      ;;
    summary)
      counts=$(grep -E '^[a-z]+: [0-9]+ passed, [0-9]+ failed' "$log" | tail -1 | awk '{ print $2, $4 }')
      ;;
  esac
  read -r p f <<<"${counts:-0 0}"
  tally "$p" "$f" "$rc"
}

check "cargo fmt" cargo fmt --all --check
check "cargo clippy" cargo clippy --workspace --all-targets --quiet -- -D warnings
check "cargo clippy (lua5.1)" cargo clippy -p whisker-sync --all-targets --quiet \
  --no-default-features --features lua51 -- -D warnings
check "luacheck" luacheck --quiet lua spec bin/whisker-sync scripts/story.lua
check "build native module (${flavours[*]})" make --no-print-directory build

counted "cargo test" cargo cargo test --workspace

# Prints what the reliability tests in the cargo run measured, and fails if
# a family of them did not run (a figure is written only by a passing test).
reliability_figures() {
  local family missing=0
  sed 's/^/    /' "$figures"
  local families=("fault " "crash client" "crash server" "fuzz " "load sqlite" "security ")
  if [ "${WHISKER_SKIP_PG:-}" != 1 ]; then
    families+=("load postgres")
  fi
  for family in "${families[@]}"; do
    if ! grep -q "^$family" "$figures"; then
      echo "no figures from the \"$family\" tests"
      missing=1
    fi
  done
  echo "$(wc -l <"$figures") figures; data lost in every one: 0"
  return "$missing"
}
check "reliability figures (docs/RELIABILITY.md)" reliability_figures
for flavour in "${flavours[@]:1}"; do
  counted "cargo test ($flavour)" cargo \
    cargo test -p whisker-sync --no-default-features --features "$(feature_of "$flavour")"
done

# With WHISKER_CORE, its lib/ comes after ours, so specs that need
# whisker-core's StorageService run against the real one.
lpath="$root/lua/?.lua;$root/lua/?/init.lua;$root/spec/?.lua"
if [ -n "${WHISKER_CORE:-}" ]; then
  lpath="$lpath;$WHISKER_CORE/lib/?.lua;$WHISKER_CORE/lib/?/init.lua"
fi
for flavour in "${flavours[@]}"; do
  counted "busted ($flavour)" busted "$flavour" "$(command -v busted)" -o plainTerminal \
    --lpath="$lpath" --cpath="$root/build/$flavour/?.so" spec
done

counted "whisker sync end to end (real server)" summary scripts/test-cli-e2e.sh
check "demo (scripts/demo.sh)" scripts/demo.sh

check "LuaRocks install (lua5.4, lua5.1)" scripts/test-rock.sh

if [ -n "${WHISKER_CORE:-}" ]; then
  counted "conformance (whisker-core specs)" summary scripts/conformance.sh
else
  echo "==> conformance: skipped (WHISKER_CORE not set)"
fi

echo
echo "$passed passed, $failed failed"
((failed == 0))
