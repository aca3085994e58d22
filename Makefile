# Set-up and the two entry points of the README. Everything installs into .venv.
# torch is installed first, alone, pinned to the CPU wheel: any looser requirement
# seen first would make pip pull a CUDA build of several GB.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedsec run

test: $(STAMP)
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) runs
