#!/usr/bin/env bash
# Install whatever is missing, then run the main job or the tests.
#
#   bash scripts/bootstrap.sh main [args...]    # the main job (its defaults: CPU, Fashion-MNIST)
#   bash scripts/bootstrap.sh test [pytest args...]
#   bash scripts/bootstrap.sh install           # only install
#
# What "installed" means: a virtualenv (.venv, or $HALP_VENV) holding torch 2.14.1 +
# torchvision 0.29.1, this project in editable mode with the dev extras, and Debian's
# dataset-fashion-mnist. Each step is skipped when already done, so re-running is cheap.
# Environment knobs: HALP_VENV, HALP_PYTHON (default python3), HALP_EXTRAS (default dev),
# HALP_TORCH (pip spec of torch + torchvision, default by CPU architecture).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${HALP_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
EXTRAS=${HALP_EXTRAS:-dev}
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

say() { printf '[bootstrap] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else return 1
  fi
}

ensure_apt_packages() {
  [ -f "$FMNIST" ] && return 0
  if ! command -v apt-get >/dev/null; then
    say "no apt-get: Fashion-MNIST is missing; jobs that need it will stop and say where to get it"
    return 0
  fi
  say "installing Debian's dataset-fashion-mnist (real data, 30 MB)"
  if ! { as_root apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
         { as_root apt-get update -q >/dev/null && as_root apt-get install -y -q dataset-fashion-mnist >/dev/null; }; }; then
    say "could not install dataset-fashion-mnist (needs root); tests that need it will be skipped"
  fi
}

ensure_venv() {
  if [ ! -x "$PY" ]; then
    say "creating virtualenv $VENV"
    "${HALP_PYTHON:-python3}" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  fi
}

torch_spec() {
  if [ -n "${HALP_TORCH:-}" ]; then echo "$HALP_TORCH"; return; fi
  case "$(uname -m)" in
    aarch64|arm64) echo "torch==2.9.1 torchvision==0.24.1" ;;
    *) echo "torch==2.14.1 torchvision==0.29.1" ;;
  esac
}

ensure_torch() {
  if "$PY" -c "import torch, torchvision" 2>/dev/null; then return 0; fi
  local spec; spec=$(torch_spec)
  say "installing $spec (a few minutes)"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q $spec 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$PY" -c "import torch, torchvision" || { say "torch install failed"; exit 1; }
}

ensure_project() {
  local stamp="$VENV/.halp-install-stamp" want
  want="$(sha256sum pyproject.toml | cut -c1-16) $EXTRAS"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import halp" 2>/dev/null; then
    return 0
  fi
  say "installing halp[$EXTRAS] (editable)"
  "$PY" -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v -e '^WARNING: Location' -e '^ *!!' >&2 || true
  "$PY" -c "import halp, torch_pruning, timm" || { say "project install failed"; exit 1; }
  echo "$want" >"$stamp"
}

install_all() {
  ensure_apt_packages
  ensure_venv
  ensure_torch
  ensure_project
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  install)
    install_all ;;
  main)
    install_all
    export WANDB_MODE=${WANDB_MODE:-offline}
    exec "$VENV/bin/halp-run" "$@" ;;
  test)
    install_all
    export WANDB_MODE=${WANDB_MODE:-offline}
    # Slow suites run only when asked for with a marker expression (-m slow, -m "slow or not slow").
    case " $* " in *" -m "*|*" -m="*) ;; *) set -- -m "not slow" "$@" ;; esac
    set +e
    "$PY" -m pytest --durations=25 "$@"   # the slowest tests, to keep the default run short
    rc=$?
    set -e
    if [ $rc -eq 5 ]; then
      say "pytest collected no tests for: $* (exit 5) - check the path or marker expression"
      exit 1
    fi
    exit $rc ;;
  *)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 2 ;;
esac
