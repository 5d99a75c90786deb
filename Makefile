# `make train`: create .venv, install, pretrain the tiny T5 on the embedded corpus.
# `make test`:  create .venv, install with test and tpu extras (libtpu, so the
#               ahead-of-time TPU compilation tests run on CPU), run the whole test suite
#               on two worker processes (pytest-xdist), test by test in collection order
#               (the slow ones first, see tests/conftest.py); an xdist_group stays on one
#               worker, which builds the group's shared fixture once.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PIP := $(VENV)/bin/pip install -q --disable-pip-version-check -c requirements/lock.txt
ARGS ?=

.PHONY: install install-test train test vocab span-stats clean

$(VENV)/.installed: setup.py requirements/lock.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test,tpu]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

train: install
	$(VENV)/bin/python -m t5x_lite.train --gin_file=gin/t5_tiny_span.gin $(ARGS)

test: install-test
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder tests $(ARGS)

vocab: install
	$(VENV)/bin/python -m t5x_lite.data.build_vocab --model_type unigram
	$(VENV)/bin/python -m t5x_lite.data.build_vocab --model_type bpe

span-stats: install
	$(VENV)/bin/python -m t5x_lite.data.span_stats

clean:
	rm -rf $(VENV) runs *.egg-info
