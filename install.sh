#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything nanochat-on-Ray needs.
#   bash install.sh          runtime + dev tools
#   bash install.sh --test   also Debian's chromium (browser test of the chat UI) and prometheus (cluster metrics test)
# On a machine without an NVIDIA GPU it installs the CPU build of torch 2.13.0 first, so pip never pulls
# a multi-GB CUDA build; on a GPU machine PyPI's default (CUDA) torch is used.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" >/dev/null 2>&1; then
  pip install -q "torch==2.13.0"
fi
EXTRAS=dev
if command -v nvidia-smi >/dev/null 2>&1; then EXTRAS=dev,gpu; fi  # gpu: the `kernels` package for FA3
pip install -q -e ".[$EXTRAS]"
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if [ "${1:-}" = "--test" ] && ! command -v prometheus >/dev/null 2>&1; then
  # Debian's Prometheus for tests/test_cluster_local.py, which runs the binary itself on a free port: a temporary
  # policy-rc.d keeps the package from starting its system service.
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  NORC=""; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null; $SUDO chmod +x /usr/sbin/policy-rc.d; NORC=1; }
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus >/dev/null
  [ -z "$NORC" ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi
echo "install.sh: ready (activate with: . .venv/bin/activate)"
