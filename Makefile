# whisker-sync: `make test` runs everything, `make build` builds the native
# module for every Lua flavour. Both install missing prerequisites first.

FLAVOURS := lua5.4 lua5.1 luajit
PROFILE ?= debug
CARGO ?= cargo

feature_lua5.4 := lua54
feature_lua5.1 := lua51
feature_luajit := luajit
feature_lua5.3 := lua53
feature_lua5.2 := lua52
profile_flag := $(if $(filter release,$(PROFILE)),--release,)

# Every flavour builds into the same cargo output file before it is copied to
# build/<flavour>/, so builds must not run in parallel.
.NOTPARALLEL:

.PHONY: all build test converge soak fuzz conformance lint fmt bootstrap clean rock-build rock-install demo $(addprefix build-,$(FLAVOURS) lua5.3 lua5.2)

all: build

bootstrap:
	@scripts/bootstrap.sh

build: $(addprefix build-,$(FLAVOURS))

# build-<flavour>: the native module for one Lua flavour, in build/<flavour>/.
# `install` replaces the file instead of rewriting it, so a running
# interpreter that has the old one loaded is not disturbed.
define flavour_build
build-$(1): bootstrap
	$(CARGO) build -p whisker-sync $(profile_flag) --no-default-features --features $(feature_$(1))
	@mkdir -p build/$(1)
	install -m 755 target/$(PROFILE)/libwhisker_sync.so build/$(1)/whisker_sync.so
endef
$(foreach flavour,$(FLAVOURS) lua5.3 lua5.2,$(eval $(call flavour_build,$(flavour))))

# LuaRocks build (rockspec/whisker-sync-scm-1.rockspec): LuaRocks passes the
# interpreter it targets as LUA and the install directories of its tree.
# ROCK_PROFILE=debug reuses the development build (used by the install test).
ROCK_PROFILE ?= release
rock_flavour = $(shell $(LUA) -e 'print(type(jit) == "table" and "luajit" or "lua" .. _VERSION:match("%d+%.%d+"))')

rock-build:
	$(MAKE) --no-print-directory build-$(rock_flavour) PROFILE=$(ROCK_PROFILE)

rock-install:
	install -d $(LIBDIR) $(LUADIR)
	install -m 755 build/$(rock_flavour)/whisker_sync.so $(LIBDIR)/whisker_sync.so
	cd lua && find . -name '*.lua' -exec install -D -m 644 {} $(LUADIR)/{} \;
	$(if $(BINDIR),install -d $(BINDIR) && install -m 755 bin/whisker-sync $(BINDIR)/whisker-sync)

test: bootstrap
	@scripts/test.sh

# demo: a server on a temporary SQLite file and two device folders synced
# with the real `whisker sync` command (scripts/demo.sh). DEMO_LUA picks the
# interpreter (lua5.4, lua5.1 or luajit).
DEMO_LUA ?= lua5.4
demo: build-$(DEMO_LUA)
	$(CARGO) build -p sync-server $(profile_flag)
	@DEMO_LUA=$(DEMO_LUA) WHISKER_SYNC_SERVER=$(CURDIR)/target/$(PROFILE)/whisker-sync-server scripts/demo.sh

# Convergence against the reference server with many more seeds than `make test`.
SEEDS ?= 2500
converge: bootstrap
	cargo build --release -p sync-server
	WHISKER_SYNC_SEEDS=$(SEEDS) WHISKER_SYNC_SERVER=$(CURDIR)/target/release/whisker-sync-server \
		cargo test --release -p sync-core --test convergence

# Reliability runs longer than `make test` (docs/RELIABILITY.md): the
# 32-client load for SOAK_SECONDS on SQLite and on PostgreSQL, then many more
# server and client kills, in release builds; prints the figures.
SOAK_SECONDS ?= 300
soak: bootstrap
	@SOAK_SECONDS=$(SOAK_SECONDS) scripts/soak.sh

# The property tests (decoding, engine, clients, server requests, version
# vectors) with FUZZ_CASES cases each instead of a few hundred.
FUZZ_CASES ?= 10000
fuzz: bootstrap
	cargo build --release -p sync-server
	PROPTEST_CASES=$(FUZZ_CASES) WHISKER_SYNC_SERVER=$(CURDIR)/target/release/whisker-sync-server \
		cargo test --release -p sync-core --lib --test fuzz -- --nocapture
	PROPTEST_CASES=$(FUZZ_CASES) cargo test --release -p sync-server --test fuzz -- --nocapture

conformance: build
	@scripts/conformance.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	luacheck lua spec bin/whisker-sync scripts/story.lua

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf build
