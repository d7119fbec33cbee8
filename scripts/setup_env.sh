#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv) with everything the
# book and the tests need. Idempotent: a second run with an unchanged
# pyproject.toml takes a second.
#
#   TORCH_SPEC  pip requirement(s) for torch, installed first when torch is missing.
#               Default: the wheels that lie on this project's machines
#               ("torch==2.14.1 torchvision==0.29.1"; timm imports torchvision, and
#               PyPI's torchvision does not import beside the local 2.13.0 CPU wheel).
#               Elsewhere e.g. TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu".
#   VENV        where the environment lives (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
STAMP="$VENV/.vmoe-installed"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$0" -nt "$STAMP" ]; then
  if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "== installing $TORCH_SPEC (first, so nothing else pulls another torch build)"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q $TORCH_SPEC
  fi
  # Keep whatever torch is installed now: a bare `pip install timm` may otherwise swap it.
  # (without the local label: ==2.14.1 matches 2.14.1+cu130, and the machine's own cap stays satisfiable)
  "$PY" -c "import torch, torchvision; print('torch==' + torch.__version__.split('+')[0]); print('torchvision==' + torchvision.__version__.split('+')[0])" > "$VENV/torch-constraints.txt"
  echo "== installing vmoe_lib (editable) with the book and test extras"
  "$PY" -m pip install -q -c "$VENV/torch-constraints.txt" -e ".[book,test]"
  touch "$STAMP"
fi

# Debian packages, when we can install them (root with apt-get):
#   dataset-fashion-mnist           Fashion-MNIST, the offline default data;
#   chromium, chromium-driver       headless browser of tests/test_book_browser.py (make test).
APT_PACKAGES=()
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  APT_PACKAGES+=(dataset-fashion-mnist)
fi
if ! command -v chromedriver >/dev/null 2>&1 || ! { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }; then
  APT_PACKAGES+=(chromium chromium-driver)
fi
if [ ${#APT_PACKAGES[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian's ${APT_PACKAGES[*]}"
    apt-get update -qq && apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
  else
    case " ${APT_PACKAGES[*]} " in *" dataset-fashion-mnist "*)
      echo "!! Fashion-MNIST not found in /usr/share/datasets/fashion-mnist and cannot apt-get it here;"
      echo "   put the four IDX .gz files in ~/.cache/vmoe/fashion_mnist or set VMOE_DATA_DIR (see README)." ;;
    esac
    case " ${APT_PACKAGES[*]} " in *" chromium "*)
      echo "!! headless Chromium not found and cannot apt-get it here: the book's browser test is skipped"
      echo "   (make test fails on it); install it with: sudo apt-get install chromium chromium-driver" ;;
    esac
  fi
fi
