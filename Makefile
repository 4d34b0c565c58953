# pg_tenancy: `make demo` shows it working, `make test` runs every test.
# Both install what they need first (scripts/deps.sh is idempotent).

PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
export PGT_ROOT ?= /tmp/pg_tenancy
export PGT_PORT ?= 5499
PGRX_TEST_DATA ?= /tmp/pg_tenancy-pgrx-test
PYTEST = target/venv/bin/pytest

.PHONY: all deps install cluster demo test test-layout test-core test-unit test-regress test-scenarios test-pg-regress bench stop clean

all: install

deps:
	@scripts/deps.sh

## Build (release) and install the extension into the system PostgreSQL 15.
# (The running cluster is stopped first: overwriting a preloaded library in place crashes it.)
install: deps
	@scripts/cluster.sh stop
	cargo pgrx install --release --pg-config $(PG_CONFIG)

## (Re)start the throwaway cluster, so the postmaster preloads the library just installed.
cluster: install
	@scripts/cluster.sh restart

## Build, install, start a cluster with pg_tenancy preloaded, and run the tour.
demo: cluster
	@scripts/demo.sh

## Every test: the crate's shape, the PostgreSQL-free core (plain cargo test), #[pg_test]
## internals, pg_regress suites, multi-session scenarios (pgbouncer too), and PostgreSQL's own
## regression suite with and without the library preloaded.
test: deps test-layout test-core test-unit test-regress test-scenarios test-pg-regress

## Imports point down, no cycles, SQL in sql/ and src/catalog/, unsafe explained.
test-layout:
	python3 scripts/check_layout.py

## The logic that needs no PostgreSQL (tenant ids, tokens, the ciphertext envelope, key wrapping,
## the protection's statements), with plain cargo test.
test-core: deps
	cargo test -p pg_tenancy_core

test-unit: deps
	@scripts/cluster.sh stop
	rm -rf $(PGRX_TEST_DATA)
	CARGO_PGRX_TEST_RUNAS=postgres CARGO_PGRX_TEST_PGDATA=$(PGRX_TEST_DATA) cargo pgrx test pg15

test-regress: cluster
	@scripts/regress.sh

test-scenarios: cluster
	$(PYTEST) -q -p no:cacheprovider pg_test/scenarios

## PostgreSQL 15's regression suite on a plain cluster and on one preloading pg_tenancy: the
## same verdicts and outputs (scripts/pg_regress_diff.sh).
test-pg-regress: install
	@scripts/pg_regress_diff.sh

## Benchmarks (see bench/README.md).
bench: cluster
	@bench/run.sh

stop:
	@scripts/cluster.sh stop

clean: stop
	@scripts/cluster.sh destroy
	cargo clean
