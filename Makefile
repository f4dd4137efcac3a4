# mtx: the two commands a new user needs.
#   make up     install + start the local servers, build, apply the topology, run the pipeline
#   make test   run every test (spawns its own servers)
SHELL := /bin/bash
MTX := target/release/mtx

.PHONY: up servers build topology run test lint stop status

up: servers build topology run

servers:
	deploy/local/servers.sh start

build:
	cargo build --release

topology: build
	$(MTX) topology apply

run:
	$(MTX) run all

stop:
	deploy/local/servers.sh stop

status:
	deploy/local/servers.sh status

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# pyref.sh installs numpy/scipy/cvxpy (idempotent) and prints the python that
# mtx-portfolio's python_reference test cross-checks max-sharpe against.
test:
	deploy/local/servers.sh install
	py=$$(deploy/local/pyref.sh install) && PORTFOLIO_REF_PYTHON=$$py cargo test --workspace
	deploy/tests/run-ops-tests.sh
