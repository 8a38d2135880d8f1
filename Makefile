# LatentSync-Realtime. `make run` streams; `make test` runs the test suite. Both set themselves up.
VENV := .venv
STAMP := $(VENV)/.installed
RTMP_PORT ?= 1935
ARGS ?=
# make run's API port: PORT, else the last server.port=... of ARGS, else the config's 11001 (for the printed URLs)
PORT ?=
RUN_PORT = $(or $(lastword $(patsubst server.port=%,%,$(filter server.port=%,$(ARGS)))),$(PORT),11001)
PYTEST_ARGS ?=

.PHONY: run test test-fast setup setup-ray setup-agents lint bench-agents format rtmp-start rtmp-stop bench bench-webrtc soak clean

$(STAMP): requirements.txt scripts/bootstrap.sh
	@bash scripts/bootstrap.sh

setup: $(STAMP)

RAY_STAMP := $(VENV)/.installed-ray
$(RAY_STAMP): $(STAMP) requirements-ray.txt
	@echo "installing the optional Ray backend (requirements-ray.txt) for its tests ..."
	@$(VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements-ray.txt >$(VENV)/pip-ray.log 2>&1 \
	  || { grep -v "^WARNING: Location" $(VENV)/pip-ray.log | tail -40 >&2; exit 1; }
	@touch $@

## setup-ray: add the optional Ray backend (pool.backend=ray) to .venv
setup-ray: $(RAY_STAMP)

AGENTS_VENV := .venv-agents
AGENTS_STAMP := $(AGENTS_VENV)/.installed
$(AGENTS_STAMP): clients/python/requirements-agents.txt clients/python/requirements.txt clients/python/pyproject.toml scripts/agents_venv.sh
	@bash scripts/agents_venv.sh

## setup-agents: the agent integrations' own virtualenv (.venv-agents: the client, pipecat-ai, livekit-agents; docs/agents.md)
setup-agents: $(AGENTS_STAMP)

## run: set up, start the local RTMP server and stream the avatar; Ctrl-C stops the server, then the
## local nginx-rtmp if this run started it. Ports: RTMP_PORT (1935), PORT or ARGS="server.port=..." (11001)
run: setup
	@bash scripts/tts.sh install
	@if RTMP_PORT=$(RTMP_PORT) bash scripts/rtmp_server.sh status >/dev/null; then started=; else started=1; fi; \
	RTMP_PORT=$(RTMP_PORT) bash scripts/rtmp_server.sh start || exit 1; \
	echo ""; \
	echo "  Live stream:   rtmp://127.0.0.1:$(RTMP_PORT)/live/avatar   (VLC: Media > Open Network Stream; or ffplay)"; \
	echo "  Control page:  http://127.0.0.1:$(RUN_PORT)/"; \
	echo "  Health:        http://127.0.0.1:$(RUN_PORT)/health"; \
	echo "  Stop:          Ctrl-C$${started:+ (stops this nginx-rtmp too)}"; \
	echo ""; \
	trap : INT TERM; \
	$(VENV)/bin/python infer_serv.py "stream.rtmp_url=$$(RTMP_PORT=$(RTMP_PORT) bash scripts/rtmp_server.sh publish-url avatar)" \
	  $(if $(PORT),server.port=$(PORT)) $(ARGS); rc=$$?; \
	if [ -n "$$started" ]; then RTMP_PORT=$(RTMP_PORT) bash scripts/rtmp_server.sh stop; fi; \
	exit $$rc

# Tiers are pytest markers (pyproject.toml; tests/conftest.py marks "unit" every test with none of the others).
# make test runs the unit tier, then the rest, one after the other (beside the real-time tests, even at nice 19,
# the unit tier made a browser test fail once), each on TEST_WORKERS pytest-xdist workers: a module's tests stay
# on one worker (they share its servers), the longest groups start first (tests/conftest.py LONG_GROUPS_S). Last,
# the modules marked solo (tests/conftest.py SOLO_MODULES: CPU-heavy, or timed against the clock) run one test at
# a time with nothing beside them. The tiers list their slowest tests (--durations): where the next minutes of
# make test are to be found.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

## test: set up (nginx-rtmp and chromium too), lint (make lint), then the whole pytest suite: the unit tier
## first (make test-fast), then the tests that start servers, FFmpeg, browsers, workers or Ray
test: setup setup-ray setup-agents
	@bash scripts/rtmp_server.sh install
	@bash scripts/tts.sh install
	@bash scripts/chromium.sh install
	@bash scripts/prometheus.sh install
	@$(MAKE) --no-print-directory lint
	$(VENV)/bin/python -m pytest -m unit $(XDIST) --durations=15 --durations-min=2 $(PYTEST_ARGS); rc=$$?; test $$rc -eq 0 -o $$rc -eq 5
	$(VENV)/bin/python -m pytest -m "not unit and not solo" $(XDIST) --durations=25 --durations-min=10 $(PYTEST_ARGS); rc=$$?; test $$rc -eq 0 -o $$rc -eq 5
	$(VENV)/bin/python -m pytest -m solo --durations=10 --durations-min=10 $(PYTEST_ARGS); rc=$$?; test $$rc -eq 0 -o $$rc -eq 5
	$(AGENTS_VENV)/bin/python -m pytest clients/python/tests $(PYTEST_ARGS); rc=$$?; test $$rc -eq 0 -o $$rc -eq 5

## test-fast: the unit tier without its slow tests (pytest -m "unit and not slow": no server, FFmpeg push, browser,
## Ray or worker processes, nor a test over a few seconds); needs only .venv
test-fast: setup
	$(VENV)/bin/python -m pytest -m "unit and not slow" $(XDIST) $(PYTEST_ARGS)

## lint: ruff, the format check, the import contracts of latentsync (pyproject.toml [tool.importlinter]) and mypy
## over latentsync/serving (pyproject.toml [tool.mypy]; the pool protocol in compute/ strictly) and, strictly, the client
## (its Pipecat and LiveKit modules and the example bot in .venv-agents, where their frameworks are)
lint: setup setup-agents
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-logo --no-cache
	$(VENV)/bin/mypy latentsync/serving
	$(VENV)/bin/mypy --strict clients/python/src
	$(AGENTS_VENV)/bin/mypy --strict clients/python/src/latentsync_client/pipecat.py \
	  clients/python/src/latentsync_client/livekit.py examples/pipecat_bot.py

## format: reformat the tree (what make test checks)
format: setup
	$(VENV)/bin/ruff format .

## rtmp-start / rtmp-stop: the local nginx-rtmp on RTMP_PORT (make run starts one and stops it if it started it)
rtmp-start:
	@RTMP_PORT=$(RTMP_PORT) bash scripts/rtmp_server.sh start

rtmp-stop:
	@RTMP_PORT=$(RTMP_PORT) bash scripts/rtmp_server.sh stop

## bench: streaming benchmark (60 s at 832x1248 against the local RTMP server)
bench: setup
	@RTMP_PORT=$(RTMP_PORT) bash scripts/rtmp_server.sh start
	$(VENV)/bin/python scripts/bench/stream_bench.py --seconds 60

## bench-agents: the agent integrations' figures (scripts/bench/agent_bench.py: TTFF, interruption, heard in Chromium;
## the 10-minute conversation: .venv-agents/bin/python scripts/bench/agent_bench.py --conversation-s 600; docs/agents.md)
bench-agents: setup setup-agents
	$(AGENTS_VENV)/bin/python scripts/bench/agent_bench.py

## bench-webrtc: server CPU with 0/1/4/8 WebRTC viewers, POST -> speech heard in the browser
bench-webrtc: setup
	@bash scripts/chromium.sh install
	@RTMP_PORT=$(RTMP_PORT) bash scripts/rtmp_server.sh start
	$(VENV)/bin/python scripts/bench/webrtc_bench.py

## soak: the chaos soak's 10-minute mode (scripts/bench/chaos_soak.py --quick: mixed load, every fault once; figures,
## summary and plot under out/soak-*); SOAK_ARGS="--minutes 120" for a long run (docs/reliability.md)
SOAK_ARGS ?= --quick
soak: setup
	@bash scripts/rtmp_server.sh install
	@bash scripts/tts.sh install
	@bash scripts/prometheus.sh install
	$(VENV)/bin/pip install -q -r requirements-soak.txt
	$(VENV)/bin/python scripts/bench/chaos_soak.py $(SOAK_ARGS)

clean:
	rm -rf .cache .run out .tools
