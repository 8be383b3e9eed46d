#!/usr/bin/env python3
r"""Train on a Cloud TPU VM (one host or a pod slice) with gcloud.

Each subcommand runs gcloud commands; with --dry_run it only prints them (one
per line, shell-quoted), so you can read or paste them. The usual sequence:

  python launch/tpu.py create --name ddpm --zone us-central2-b \
      --project my-proj --accelerator v4-32 --spot
  python launch/tpu.py setup  --name ddpm --zone us-central2-b --project my-proj
  python launch/tpu.py train  --name ddpm --zone us-central2-b --project my-proj \
      --config configs/cifar10_ddpm.py --workdir gs://my-bucket/runs/cifar10 \
      -- --config.data.data_dir=gs://my-bucket/tensorflow_datasets
  python launch/tpu.py logs   --name ddpm --zone us-central2-b --project my-proj
  python launch/tpu.py delete --name ddpm --zone us-central2-b --project my-proj

`train` starts the same command on every worker (--worker=all) in the
background (nohup, log in ~/train.log) with --distributed, so the workers
find each other through the TPU metadata. Resuming after a preemption is
running `train` again (after `create` + `setup` if the VM was reclaimed): the
trainer resumes from the last checkpoint in --workdir, which therefore has to
outlive the VM, i.e. be a gs:// bucket (required for pod slices, whose
workers must all see the same checkpoints).
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_TPU = 'jax[tpu]==0.10.2'
REMOTE_DIR = '~/diffusion_jax'
REMOTE_LOG = '~/train.log'
# Software versions per TPU generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {'v2': 'tpu-ubuntu2204-base', 'v3': 'tpu-ubuntu2204-base',
            'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite',
            'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}
# TensorCores (v2-v4, v5p) or chips (v5litepod, v6e) per host.
PER_HOST = {'v2': 8, 'v3': 8, 'v4': 8, 'v5p': 8, 'v5litepod': 8, 'v6e': 8}


class LaunchError(ValueError):
  """A bad option; the message says what to change."""


def parse_accelerator(accelerator: str) -> tuple[str, int]:
  """'v4-32' -> ('v4', 32); fails on anything gcloud would reject."""
  match = re.fullmatch(r'(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)', accelerator)
  if not match:
    raise LaunchError(
        f'--accelerator {accelerator!r} is not a TPU type: use e.g. v3-8, '
        'v4-8, v4-32, v5p-16, v5litepod-8 or v6e-8')
  return match.group(1), int(match.group(2))


def num_hosts(accelerator: str) -> int:
  generation, size = parse_accelerator(accelerator)
  return max(1, size // PER_HOST[generation])


def _where(args) -> list[str]:
  out = ['--zone', args.zone]
  if args.project:
    out += ['--project', args.project]
  return out


def _ssh(args, command: str, worker: str = 'all') -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', args.name,
          *_where(args), f'--worker={worker}', f'--command={command}']


def create_commands(args) -> list[list[str]]:
  generation, _ = parse_accelerator(args.accelerator)
  cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', args.name,
         *_where(args), f'--accelerator-type={args.accelerator}',
         f'--version={args.runtime_version or RUNTIMES[generation]}']
  if args.spot:
    cmd.append('--spot')  # Reclaimable at any time; far cheaper.
  if args.preemptible:
    cmd.append('--preemptible')  # The older, 24-hour-limited kind.
  return [cmd]


def setup_commands(args) -> list[list[str]]:
  """Code onto every worker (a tarball of this checkout, or git clone), then
  a venv with the pinned requirements and the TPU build of jax."""
  install = (f'cd {REMOTE_DIR} && python3 -m venv .venv && '
             '.venv/bin/pip install --quiet --upgrade pip && '
             f".venv/bin/pip install --quiet -r requirements.txt '{JAX_TPU}' && "
             '.venv/bin/pip install --quiet --no-deps -e .')
  if args.repo:
    branch = f' --branch {shlex.quote(args.branch)}' if args.branch else ''
    fetch = (f'rm -rf {REMOTE_DIR} && git clone --depth 1{branch} '
             f'{shlex.quote(args.repo)} {REMOTE_DIR}')
    return [_ssh(args, f'{fetch} && {install}')]
  tarball = args.tarball
  return [
      ['tar', 'czf', tarball, '--exclude=.venv', '--exclude=.git',
       '--exclude=workdir', '--exclude=__pycache__', '-C', REPO, '.'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball,
       f'{args.name}:~/diffusion_jax.tgz', *_where(args), '--worker=all'],
      _ssh(args, f'rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && '
           f'tar xzf ~/diffusion_jax.tgz -C {REMOTE_DIR} && {install}'),
  ]


def train_command_line(args) -> str:
  """The trainer invocation every worker runs (the same on all of them)."""
  return shlex.join([
      '.venv/bin/python', '-m', 'diffusion_jax.main', f'--config={args.config}',
      f'--workdir={args.workdir}', '--distributed', *args.overrides])


def train_commands(args) -> list[list[str]]:
  if args.accelerator and num_hosts(args.accelerator) > 1 and not (
      args.workdir.startswith('gs://')):
    raise LaunchError(
        f'--workdir {args.workdir!r} is not a gs:// bucket: the '
        f'{num_hosts(args.accelerator)} workers of a {args.accelerator} must '
        'all read and write the same checkpoints, and they must survive the '
        'VM. Use --workdir gs://BUCKET/runs/NAME.')
  if not args.workdir.startswith('gs://'):
    print(f'warning: --workdir {args.workdir} is on the VM disk: a deleted or '
          'reclaimed VM loses it; prefer gs://BUCKET/...', file=sys.stderr)
  # nohup + no stdin: the run outlives the ssh session; `setsid` detaches it
  # from the session's process group so ssh returns at once.
  start = (f'cd {REMOTE_DIR} && TF_CPP_MIN_LOG_LEVEL=3 setsid nohup '
           f'{train_command_line(args)} > {REMOTE_LOG} 2>&1 < /dev/null &')
  return [_ssh(args, start)]


def logs_commands(args) -> list[list[str]]:
  follow = '-F' if args.follow else ''
  return [_ssh(args, f'tail {follow} -n {args.lines} {REMOTE_LOG}'.replace(
      '  ', ' '), worker=args.worker)]


def stop_commands(args) -> list[list[str]]:
  # SIGTERM is what a preemption sends: every worker saves the same step.
  return [_ssh(args, 'pkill -TERM -f diffusion_jax.main || true')]


def delete_commands(args) -> list[list[str]]:
  return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', args.name,
           *_where(args), '--quiet']]


def status_commands(args) -> list[list[str]]:
  return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', args.name,
           *_where(args), '--format=value(state,health,acceleratorType)']]


COMMANDS = {'create': create_commands, 'setup': setup_commands,
            'train': train_commands, 'logs': logs_commands,
            'stop': stop_commands, 'delete': delete_commands,
            'status': status_commands}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)

  def add(name, help_):
    p = sub.add_parser(name, help=help_)
    p.add_argument('--name', required=True, help='TPU VM name.')
    p.add_argument('--zone', required=True, help='e.g. us-central2-b.')
    p.add_argument('--project', default=None,
                   help='GCP project (default: gcloud config).')
    p.add_argument('--dry_run', action='store_true',
                   help='Print the commands instead of running them.')
    return p

  p = add('create', 'Create the TPU VM.')
  p.add_argument('--accelerator', required=True,
                 help='v3-8, v4-8, a pod slice such as v4-32, ...')
  p.add_argument('--runtime_version', default=None,
                 help='TPU software version (default: per generation).')
  p.add_argument('--spot', action='store_true', help='Spot VM (preemptible).')
  p.add_argument('--preemptible', action='store_true',
                 help='Legacy preemptible VM.')

  p = add('setup', 'Copy the code to every worker and install it.')
  p.add_argument('--repo', default=None,
                 help='git URL to clone on the workers instead of copying '
                 'this checkout.')
  p.add_argument('--branch', default=None, help='With --repo.')
  p.add_argument('--tarball', default=os.path.join(
      tempfile.gettempdir(), 'diffusion_jax.tgz'), help='Local tarball path.')

  p = add('train', 'Start (or resume) training on every worker.')
  p.add_argument('--config', default='configs/cifar10_ddpm.py')
  p.add_argument('--workdir', required=True,
                 help='gs://BUCKET/runs/NAME (required for pod slices).')
  p.add_argument('--accelerator', default=None,
                 help='If given, checks that a pod slice uses gs://.')
  p.add_argument('overrides', nargs='*',
                 help='After --: trainer flags, e.g. --config.batch_size=256.')

  p = add('logs', "Show a worker's training log.")
  p.add_argument('--worker', default='0')
  p.add_argument('--lines', type=int, default=100)
  p.add_argument('--no_follow', dest='follow', action='store_false',
                 help='Print and return instead of streaming.')

  add('stop', 'SIGTERM the trainer on every worker (saves, then exits).')
  add('delete', 'Delete the TPU VM (checkpoints on gs:// stay).')
  add('status', 'State and health of the TPU VM.')
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    commands = COMMANDS[args.command](args)
  except LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for cmd in commands:
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      code = subprocess.call(cmd)
      if code:
        return code
  return 0


if __name__ == '__main__':
  sys.exit(main())
