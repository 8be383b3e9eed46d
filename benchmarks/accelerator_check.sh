#!/usr/bin/env bash
# The accelerator check of issue 17, ready to run on a machine with one GPU or
# TPU and this checkout: installs the jax build for the accelerator, then runs
# benchmarks/accelerator_check.py (the paper U-Net and DiT-B/2 train steps at
# batch 128, and diffusers' UNet2DModel when torch and diffusers import) under
# `timeout 540`.
#
#   bash benchmarks/accelerator_check.sh [--no_install] [--with_torch] \
#       [accelerator_check.py flags, e.g. --steps=20 --dtype=float32]
#   bash benchmarks/accelerator_check.sh --dry_run [--run]
#
# Platform: $ACCELERATOR (gpu, tpu or cpu) if set; else gpu when nvidia-smi
# lists a GPU; tpu when /dev/accel* exists, TPU_NAME or TPU_ACCELERATOR_TYPE
# is set, or a Google PCI device (vendor 0x1ae0, not a network card) sits
# behind /dev/vfio; else cpu.
# Venv: $VENV (default .venv) if it has bin/python, else `python3 -m venv`
# and `pip install -r requirements.txt`.
# jax build: jax[cuda12] (gpu) or jax[tpu] from the libtpu find-links (tpu)
# at the jax version pinned in requirements.txt (else the venv's own), so the
# API is the one the code is tested with; skipped when the venv's jax already
# runs on the platform, and with --no_install. cpu: requirements.txt's jax.
# --with_torch: also torch and diffusers at requirements-convert.txt's pins
# (on a GPU host torch's CUDA build, several GB; else its CPU build).
# --dry_run: prints the platform, the commands it would run and the
# benchmark's command (with --smoke) and exits 0, installing nothing; with
# --run it then runs that smoke command in the venv as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=$VENV/bin/python
q_venv=$(printf %q "$VENV") q_py=$(printf %q "$PY")  # for the command strings
LIBTPU_URL=https://storage.googleapis.com/jax-releases/libtpu_releases.html

dry_run=0 run=0 install=1 with_torch=0
args=()
for arg in "$@"; do
  case "$arg" in
    --dry_run) dry_run=1 ;;
    --run) run=1 ;;
    --no_install) install=0 ;;
    --with_torch) with_torch=1 ;;
    *) args+=("$arg") ;;
  esac
done
if (( dry_run )); then
  args+=(--smoke)
fi

google_accelerator() {  # a TPU chip through vfio (TPU v5e and later)
  local d
  compgen -G '/dev/vfio/[0-9]*' >/dev/null || return 1
  for d in /sys/bus/pci/devices/*; do
    if [[ $(cat "$d/vendor" 2>/dev/null) == 0x1ae0 &&
          $(cat "$d/class" 2>/dev/null) != 0x02* ]]; then
      return 0
    fi
  done
  return 1
}

platform=${ACCELERATOR:-}
if [[ -z $platform ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 &&
     nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    platform=gpu
  elif compgen -G '/dev/accel*' >/dev/null || [[ -n ${TPU_NAME:-} ||
       -n ${TPU_ACCELERATOR_TYPE:-} ]] || google_accelerator; then
    platform=tpu
  else
    platform=cpu
  fi
fi
case "$platform" in
  gpu|tpu|cpu) ;;
  *) echo "error: ACCELERATOR=$platform: want gpu, tpu or cpu" >&2; exit 2 ;;
esac

pin() {  # pin FILE PACKAGE: the version FILE pins PACKAGE at, if any
  sed -n "s/^$2==\([^ ;#]*\).*/\1/p" "$1" 2>/dev/null | head -n 1 || true
}
jax_version=$(pin requirements.txt jax)
if [[ -z $jax_version ]]; then  # no pin: the venv's jax
  jax_version=$(compgen -G "$VENV/lib/python*/site-packages/jax-*.dist-info" |
                head -n 1 | sed 's/.*jax-\(.*\)\.dist-info/\1/' || true)
fi
version_spec=${jax_version:+==$jax_version}

setup=()   # commands, each a string for bash -c
venv_note="venv: $VENV"
if [[ -x $PY ]]; then
  venv_note+=" (exists: reused)"
else
  setup+=("python3 -m venv $q_venv"
          "$q_py -m pip install --quiet --upgrade pip"
          "$q_py -m pip install --quiet -r requirements.txt")
fi
jax_install=
case "$platform" in
  gpu) jax_install="$q_py -m pip install -U 'jax[cuda12]$version_spec'" ;;
  tpu) jax_install="$q_py -m pip install -U 'jax[tpu]$version_spec'"
       jax_install+=" -f $LIBTPU_URL" ;;
esac
torch_install=
if (( with_torch )); then
  torch_install="$q_py -m pip install"
  torch_install+=" 'torch==$(pin requirements-convert.txt torch)'"
  torch_install+=" 'diffusers==$(pin requirements-convert.txt diffusers)'"
  if [[ $platform != gpu ]]; then  # torch's CPU build, not the CUDA one
    torch_install+=" --extra-index-url https://download.pytorch.org/whl/cpu"
  fi
fi
bench=(timeout 540 "$PY" benchmarks/accelerator_check.py "${args[@]}")

echo "platform: $platform (jax ${jax_version:-unpinned}); $venv_note"
if (( dry_run )); then
  echo "would run:"
  for c in "${setup[@]}"; do echo "  $c"; done
  if [[ -n $jax_install ]]; then
    echo "  $jax_install  # unless $VENV's jax already runs on $platform"
  else
    echo "  # $platform: requirements.txt's jax, no other build"
  fi
  if [[ -n $torch_install ]]; then echo "  $torch_install"; fi
  echo "  TF_CPP_MIN_LOG_LEVEL=3 $(printf '%q ' "${bench[@]}")"
  if (( ! run )); then
    exit 0
  fi
  echo "running the smoke benchmark (no installs):"
else
  for c in "${setup[@]}"; do echo "+ $c"; bash -c "$c"; done
  if [[ -n $jax_install ]] && (( install )); then
    backend=$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null ||
              true)
    if [[ $backend == "$platform" ]]; then
      echo "jax in $VENV already runs on $platform"
    else
      echo "+ $jax_install"
      bash -c "$jax_install"
    fi
  fi
  if [[ -n $torch_install ]] && (( install )); then
    echo "+ $torch_install"
    bash -c "$torch_install"
  fi
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
exec "${bench[@]}"
