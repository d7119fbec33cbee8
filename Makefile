# The two commands of the README, plus the one that regenerates results of record.
#   make book   - build the book (HTML in _build/book/_build/html) from the committed results, offline
#   make test   - unit tests, every chapter notebook with the smoke preset, the book build, and the
#                 built book in headless Chromium (tests/test_book_browser.py)
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

# The browser tests read the built book, so they run after the build; VMOE_REQUIRE_BROWSER=1 makes a
# missing book or Chromium a failure instead of a skip.
test: env
	$(PY) -m pytest -p no:cacheprovider -m "not browser" tests notebooks --nbval-lax --nbval-cell-timeout=900
	$(PY) scripts/build_book.py --preset cpu
	VMOE_REQUIRE_BROWSER=1 $(PY) -m pytest -p no:cacheprovider -m browser tests/test_book_browser.py

results: env
	$(PY) -m vmoe_lib run $(CHAPTER) --preset $(PRESET)

clean:
	rm -rf _build results/smoke results/custom
