"""launch/: the exact commands the TPU and SLURM scripts would run (no cloud
here, so --dry_run prints them and these tests read them)."""

import os
import shlex
import subprocess
import sys

import pytest

from tests.test_cli import REPO

sys.path.insert(0, os.path.join(REPO, 'launch'))
import tpu  # pylint: disable=g-import-not-at-top,wrong-import-position

WHERE = ['--name', 'ddpm', '--zone', 'us-central2-b', '--project', 'proj']


def dry_run(capsys, *argv):
  code = tpu.main([argv[0], '--dry_run', *WHERE, *argv[1:]])
  out, err = capsys.readouterr()
  return code, [shlex.split(line) for line in out.splitlines()], err


@pytest.mark.parametrize('accelerator', ['v3-8', 'v4-8', 'v4-32'])
def test_create(capsys, accelerator):
  code, cmds, _ = dry_run(capsys, 'create', '--accelerator', accelerator,
                          '--spot')
  assert code == 0 and len(cmds) == 1
  cmd = cmds[0]
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'ddpm']
  assert f'--accelerator-type={accelerator}' in cmd
  assert '--spot' in cmd and '--version=tpu-ubuntu2204-base' in cmd
  assert cmd[cmd.index('--zone') + 1] == 'us-central2-b'
  assert cmd[cmd.index('--project') + 1] == 'proj'


def test_create_on_demand_with_a_runtime_version(capsys):
  _, (cmd,), _ = dry_run(capsys, 'create', '--accelerator', 'v5litepod-8',
                         '--runtime_version', 'v2-alpha-tpuv5-lite')
  assert '--spot' not in cmd and '--version=v2-alpha-tpuv5-lite' in cmd


def test_bad_accelerator_is_rejected(capsys):
  code, cmds, err = dry_run(capsys, 'create', '--accelerator', 'v9-8')
  assert code == 2 and not cmds
  assert "'v9-8' is not a TPU type" in err and 'v4-32' in err


def test_setup_copies_and_installs_on_every_worker(capsys):
  code, cmds, _ = dry_run(capsys, 'setup')
  assert code == 0
  tar, scp, ssh = cmds
  assert tar[:2] == ['tar', 'czf'] and '--exclude=.venv' in tar
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert '--worker=all' in scp and 'ddpm:~/diffusion_jax.tgz' in scp
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'ddpm']
  assert '--worker=all' in ssh
  remote = ssh[-1]
  assert remote.startswith('--command=')
  assert "pip install --quiet -r requirements.txt 'jax[tpu]==0.10.2'" in remote


def test_setup_by_git_clone(capsys):
  _, (ssh,), _ = dry_run(capsys, 'setup', '--repo',
                         'https://github.com/me/diffusion_jax.git',
                         '--branch', 'main')
  assert '--worker=all' in ssh
  assert ('git clone --depth 1 --branch main '
          'https://github.com/me/diffusion_jax.git ~/diffusion_jax') in ssh[-1]


def test_train_starts_the_same_command_on_all_workers(capsys):
  code, (ssh,), _ = dry_run(
      capsys, 'train', '--accelerator', 'v4-32', '--config',
      'configs/cifar10_ddpm.py', '--workdir', 'gs://bucket/runs/c10', '--',
      '--config.batch_size=256', '--config.steps_per_call=10')
  assert code == 0
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'ddpm']
  assert '--worker=all' in ssh
  remote = ssh[-1][len('--command='):]
  assert 'nohup' in remote and remote.endswith(
      '> ~/train.log 2>&1 < /dev/null &')
  train = shlex.split(remote.split('nohup ', 1)[1].split(' >', 1)[0])
  assert train == ['.venv/bin/python', '-m', 'diffusion_jax.main',
                   '--config=configs/cifar10_ddpm.py',
                   '--workdir=gs://bucket/runs/c10', '--distributed',
                   '--config.batch_size=256', '--config.steps_per_call=10']


def test_a_pod_slice_needs_a_gs_workdir(capsys):
  code, cmds, err = dry_run(capsys, 'train', '--accelerator', 'v4-32',
                            '--workdir', 'runs/local')
  assert code == 2 and not cmds
  assert 'gs://' in err and '4 workers' in err
  # One host may use its disk (with a warning).
  code, cmds, err = dry_run(capsys, 'train', '--accelerator', 'v3-8',
                            '--workdir', 'runs/local')
  assert code == 0 and len(cmds) == 1 and 'warning' in err


def test_logs_stop_delete(capsys):
  _, (logs,), _ = dry_run(capsys, 'logs')
  assert '--worker=0' in logs and logs[-1] == '--command=tail -F -n 100 ~/train.log'
  _, (stop,), _ = dry_run(capsys, 'stop')
  assert '--worker=all' in stop and 'pkill -TERM' in stop[-1]
  _, (delete,), _ = dry_run(capsys, 'delete')
  assert delete[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'ddpm']
  assert '--quiet' in delete


def test_tpu_script_runs_as_a_command():
  out = subprocess.run(
      [sys.executable, 'launch/tpu.py', 'delete', '--dry_run', *WHERE],
      cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
  assert out.stdout.startswith('gcloud compute tpus tpu-vm delete ddpm')


def _sbatch(*args, **env):
  return subprocess.run(
      ['bash', 'launch/gpu_slurm.sbatch', *args], cwd=REPO, text=True,
      capture_output=True, timeout=60,
      env={'PATH': os.environ['PATH'], 'HOME': os.environ.get('HOME', '/'),
           **env})


def test_slurm_script_one_task_per_host_with_distributed():
  out = _sbatch('--dry_run', '--config=configs/cifar10_ddpm.py',
                '--workdir=/shared/runs/c10', '--config.batch_size=256',
                SLURM_SUBMIT_DIR='/home/me/diffusion_jax')
  assert out.returncode == 0, out.stderr
  cmd = shlex.split(out.stdout)
  assert cmd[:4] == ['srun', '--ntasks-per-node=1', '--kill-on-bad-exit=1',
                     '--chdir=/home/me/diffusion_jax']
  assert cmd[4:] == ['/home/me/diffusion_jax/.venv/bin/python', '-m',
                     'diffusion_jax.main', '--distributed',
                     '--config=configs/cifar10_ddpm.py',
                     '--workdir=/shared/runs/c10', '--config.batch_size=256']
  header = open(os.path.join(REPO, 'launch', 'gpu_slurm.sbatch')).read()
  for line in ('#SBATCH --ntasks-per-node=1', '#SBATCH --signal=TERM@300',
               '#SBATCH --requeue'):
    assert line in header


def test_slurm_script_with_an_explicit_coordinator():
  out = _sbatch('--dry_run', '--config=c.py', '--workdir=/w',
                COORDINATOR_PORT='1234', SLURM_JOB_NUM_NODES='4',
                SLURM_JOB_NODELIST='gpu01', SLURM_SUBMIT_DIR='/r')
  assert out.returncode == 0, out.stderr
  cmd = shlex.split(out.stdout)
  assert cmd[:5] == ['srun', '--ntasks-per-node=1', '--kill-on-bad-exit=1',
                     'bash', '-c']
  inner = cmd[5]
  assert inner.startswith('cd /r && exec /r/.venv/bin/python -m '
                          'diffusion_jax.main --config=c.py --workdir=/w ')
  assert inner.endswith('--coordinator_address=gpu01:1234 --num_processes=4 '
                        '--process_id=$SLURM_PROCID')


def test_slurm_script_needs_config_and_workdir():
  out = _sbatch('--dry_run', '--workdir=/w')
  assert out.returncode == 2 and '--config=FILE' in out.stderr
