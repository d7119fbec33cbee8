# The two commands of the README, plus the one that regenerates results of record.
#   make book   - build the book (HTML in _build/book/_build/html) from the committed results, offline
#   make test   - unit tests, every chapter notebook with the smoke preset, and the book build
#   make results CHAPTER=dense_baselines PRESET=cpu - (re)train a chapter's missing results
VENV ?= .venv
PY := $(VENV)/bin/python
CHAPTER ?= dense_baselines
PRESET ?= cpu

.PHONY: env book test results clean

env:
	@bash scripts/setup_env.sh

book: env
	$(PY) scripts/build_book.py --preset cpu

test: env
	$(PY) -m pytest -p no:cacheprovider tests notebooks --nbval-lax --nbval-cell-timeout=900
	$(PY) scripts/build_book.py --preset cpu

results: env
	$(PY) -m vmoe_lib run $(CHAPTER) --preset $(PRESET)

clean:
	rm -rf _build results/smoke results/custom
