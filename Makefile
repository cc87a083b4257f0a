# Two set-up commands: `make demo` and `make test` create .venv and install into it when needed.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.maeclip-installed
# Manifest and Terraform linters (checkov, kubernetes-validate, yamllint, kubectl, hadolint) live in their own
# venv: checkov's pins would downgrade packages that torch, s3fs and google-auth need.
TOOLS := .venv-tools/.installed
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install demo study test lint bench clean

install: $(STAMP)

# torch and torchvision go first and exactly: a loose pin pulls a second multi-GB build (pip would otherwise pick a CUDA build).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip check
	@touch $@

$(TOOLS): tests/tools/requirements.txt tests/tools/constraints.txt tests/tools/install.sh
	bash tests/tools/install.sh

demo: $(STAMP)
	$(VENV)/bin/maeclip demo

# The mini-study at full length and 3 seeds: (clip, maeclip) × (cls, gap) × seeds 0-2, 2 gated segments each,
# one process per variant (kfp.local runs two variants at a time); about 30 minutes on 2 CPU cores, estimated
# from the demo's rates (not measured).
study: $(STAMP)
	$(VENV)/bin/maeclip pipeline run --local --pipeline study --segments 2 --seeds 0 1 2 --nproc-per-node 1 \
		--set data.num_workers=1

test: $(STAMP) $(TOOLS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	@for script in bench/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf .maeclip .pytest_cache .ruff_cache .hypothesis
