# jobmesh: the two commands are `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench lint format schemas check-schemas deploy-files install clean dev-stop typecheck-tree system-packages

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11+) on PATH; or run: make PYTHON=python3 ..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,test,lint,examples]'
	touch $(STAMP)

install: $(STAMP)

# The sandbox isolation level needs bubblewrap; the webhook examples (README, docs, tests)
# sign and send with openssl and curl; the dashboard's browser test drives Debian's
# chromium through Playwright (browser downloads do not work here). As root with apt, what is missing is installed here;
# otherwise this says what is missing (executors then advertise the process level only,
# and the tests that need the tool fail, saying why).
SYSTEM_PACKAGES := bwrap:bubblewrap curl:curl openssl:openssl chromium:chromium chromedriver:chromium-driver
system-packages:
	@for pair in $(SYSTEM_PACKAGES); do \
		cmd=$${pair%%:*}; pkg=$${pair#*:}; \
		if command -v $$cmd >/dev/null 2>&1; then continue; fi; \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing $$pkg"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkg >/dev/null 2>&1 || \
			{ apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkg >/dev/null; }; \
		else \
			echo "$$cmd is missing: install the $$pkg package (as root: apt-get install $$pkg)" >&2; \
		fi; \
	done

## run: set up, start a local cluster (nats-server, Postgres, five services) and show a demo
run: $(STAMP) system-packages
	$(BIN)/jobmesh dev --demo

## test: set up, then run every test against real nats-server and Postgres processes
test: $(STAMP) system-packages
	$(BIN)/pytest -q -ra

## bench: print figures: end to end beside the raw JetStream baseline (NATS with and without an fsync per write), a trigger rule's event-to-job path beside a plain submit, a workflow step beside a plain job and a 1,000-item fan-out, the scheduler alone (with 10,000 workflow runs in flight too), attempt start-up per isolation level (at a job's default 100 millicores and at a full core)
bench: $(STAMP) system-packages
	$(BIN)/python -m jobmesh.dev.bench
	$(BIN)/python -m jobmesh.dev.triggerbench
	$(BIN)/python -m jobmesh.dev.workflowbench
	$(BIN)/python -m jobmesh.dev.schedbench
	$(BIN)/python -m jobmesh.dev.startbench
	$(BIN)/python -m jobmesh.dev.startbench --cpu 1000

.PHONY: bench-scale
## bench-scale: 1,000,000 no-op jobs through the cluster (tens of minutes; not run in CI): throughput per 100,000-job window, history rows and each service's memory (BENCH_SCALE_ARGS="--jobs 200000 --window 20000" for a shorter run)
bench-scale: $(STAMP) system-packages
	$(BIN)/python -m jobmesh.dev.scalebench $(BENCH_SCALE_ARGS)

.PHONY: chaos
## chaos: two replicas of each service and three executor nodes, supervised, under kill -9 every 2 s, a NATS and a Postgres restart and a SIGSTOPped executor; 10,000 mixed jobs; prints loss, duplication, leaks, dead letters and recovery times from the durable records (docs/chaos.md)
chaos: $(STAMP) system-packages
	$(BIN)/python -m jobmesh.dev.chaos

.PHONY: chaos-short
## chaos-short: the same in short (1,200 jobs, an 80 s window, every fault kind; about 2 minutes); CI runs it as tests/test_chaos_short.py
chaos-short: $(STAMP) system-packages
	$(BIN)/python -m jobmesh.dev.chaos --jobs 1200 --seconds 80 --settle 150

# mypy and import-linter read the package as it is installed: services/<name> is
# jobmesh.<name>. This tree of links shows them that layout.
TYPECHECK := $(VENV)/typecheck
typecheck-tree: $(STAMP)
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/jobmesh
	@for f in libs/jobmesh/*; do ln -s "$(CURDIR)/$$f" $(TYPECHECK)/jobmesh/; done
	@for s in trigger scheduler binder executor tracker; do ln -s "$(CURDIR)/services/$$s" $(TYPECHECK)/jobmesh/$$s; done

## lint: ruff (lint and format check), mypy (strict on contract/ and runtime/), import contracts
lint: typecheck-tree
	$(BIN)/ruff check libs services tests
	$(BIN)/ruff format --check libs services tests
	$(BIN)/mypy -p jobmesh
	PYTHONPATH=$(TYPECHECK) $(BIN)/lint-imports

## format: apply ruff's formatting and safe fixes
format: $(STAMP)
	$(BIN)/ruff check --fix libs services tests
	$(BIN)/ruff format libs services tests

## schemas: regenerate schemas/ from the message types (and the OpenAPI documents of the HTTP API and the trigger's ingress)
schemas: $(STAMP)
	$(BIN)/python -m jobmesh.dev.schemas
	$(BIN)/python -m jobmesh.web.openapi > schemas/http-api.json
	$(BIN)/python -m jobmesh.trigger.webhooks > schemas/openapi.json

## deploy-files: regenerate compose.yaml and deploy/ (Nomad jobs, Prometheus scrape configs) from deploy/services.yaml
deploy-files: $(STAMP)
	$(BIN)/python -m jobmesh.dev.deploygen

check-schemas: $(STAMP)
	$(BIN)/python -m jobmesh.dev.schemas --check

dev-stop: $(STAMP)
	$(BIN)/jobmesh dev --stop

clean:
	rm -rf $(VENV) .jobmesh .pytest_cache
