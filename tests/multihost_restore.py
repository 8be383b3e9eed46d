"""One of the 2 processes of tests/test_multihost.py's topology test: restore
a checkpoint written by 1 process on 8 devices (fsdp 8) onto a (data 2,
fsdp 2) mesh over 2 processes x 2 devices, and write what this process holds
(each addressable shard with its index, and the first train batch after the
restored step, gathered) to a pickle for the test to compare bit-exactly.

  python tests/multihost_restore.py PORT PROCESS_ID WORKDIR OUT.pkl
"""

import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from diffusion_jax import checkpointing, experiment, parallel
from tests.util import tiny_config

# The overrides of tests/test_cli.py's TINY that shape the state and data.
CONFIG = {'diffusion.num_timesteps': 10, 'mesh.fsdp': 2}


def main(port: str, process_id: str, workdir: str, out: str) -> None:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                             num_processes=2, process_id=int(process_id))
  exp = experiment.build(tiny_config(**CONFIG))  # mesh from config.mesh
  assert dict(exp.mesh.shape) == {'data': 2, 'fsdp': 2}, exp.mesh.shape
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  state, data = ckpt.restore(exp.abstract_state())
  ckpt.close()
  shards = []
  for leaf in jax.tree.leaves(state):
    shards.append([(tuple((s.start, s.stop) for s in shard.index),
                    jax.device_get(shard.data))
                   for shard in leaf.addressable_shards])
  it = exp.train_iterator(start_step=data['step'])
  batch = parallel.gather(next(it))
  it.close()
  with open(out, 'wb') as f:
    pickle.dump({'data': data, 'shards': shards, 'batch': batch,
                 'fsdp_shape': state.params['conv_in']['kernel']
                 .addressable_shards[0].data.shape}, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(*sys.argv[1:])
