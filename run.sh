#!/usr/bin/env bash
# The two commands of the quick start. Each creates .venv from
# requirements.txt first if it is missing or out of date, so they work on a
# fresh clone in either order.
#
#   ./run.sh train [--config.key=value ...]   train configs/default.py (digits)
#   ./run.sh test  [pytest args ...]          run the test suite
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.requirements.sha256

ensure_venv() {
  local want
  want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
  if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
    return
  fi
  echo "Setting up $VENV from requirements.txt (first run: a few minutes)..."
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  echo "$want" > "$STAMP"
}

cmd=${1:-}
shift || true
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
case "$cmd" in
  train)
    ensure_venv
    workdir=${WORKDIR:-workdir/digits}
    "$VENV/bin/python" -m diffusion_jax.main --config=configs/default.py \
      --workdir="$workdir" "$@"
    echo
    echo "Done. Outputs in $workdir:"
    echo "  run report:       $workdir/report.html (open it in a browser)"
    echo "  EMA sample grid:  $(ls -1 "$workdir"/samples/*.png 2>/dev/null | tail -1)"
    echo "  checkpoints:      $workdir/checkpoints"
    echo "  TensorBoard logs: tensorboard --logdir $workdir"
    ;;
  test)
    ensure_venv
    "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./run.sh train [--config.KEY=VALUE ...] | ./run.sh test [PYTEST_ARGS ...]" >&2
    exit 2
    ;;
esac
