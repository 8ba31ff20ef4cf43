# The two commands of the README. Both set up .venv first: torch pinned to the CPU build before
# anything that depends on torch, so pip never resolves a multi-GB CUDA build (GPU users: install
# your own torch into .venv first; `make install` keeps it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install quickstart test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[all,test]"
	touch $(STAMP)

quickstart: install
	$(VENV)/bin/scalestudy run studies/quickstart.yaml
	$(VENV)/bin/scalestudy report runs/quickstart
	@echo "open runs/quickstart/report/index.html"

test: install
	$(PY) -m pytest -q

# Every test that does not train a model, start Ray, need the local Slurm or drive a browser:
# what to run on every change (README, "Development"); about 1.5 minutes on a busy 2-core machine.
# It still runs single optimisation steps (tests/test_trainer.py), so a broken training step fails
# here; tests/conftest.py stops any test that trains or calls sbatch without its marker.
test-fast: install
	$(PY) -m pytest -q -m "not train and not ray and not slurm and not browser"

clean:
	rm -rf $(VENV) runs
