"""Devices and hosts: the 1-D 'data' mesh (batch sharded, parameters replicated), multi-host start-up, global
batches assembled from each process's rows, and batches prefetched to the devices. Used by the training loop,
the evaluator and the bench."""
from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from iaf_jax import config_lib, data as data_lib


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D 'data' mesh over every device of every host (or the first `num_devices`): batch sharded,
  parameters replicated."""
  return Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of parameters and optimizer state: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The sharding of a batch: its leading axis split over 'data'."""
  return NamedSharding(mesh, P("data"))


def shard_examples(fn, mesh: Mesh):
  """fn(params, examples, key) -> per-example outputs (leading axis the examples'), run by every device on its
  own shard of the examples (shard_map), params replicated; the identity on a 1-device mesh.

  Plain jit of a batch-sharded evaluation is not split: the importance sampler tiles the batch sample-major
  ([K * B] rows, objectives.tile_samples), a layout the SPMD partitioner does not shard by example, so every
  device computed every example (measured by the bench: per-device flops of the 2-device program = the whole
  1-device program's). Each device folds its index into the key, so its draws are its own: the estimates on N
  devices differ from 1 device's by Monte Carlo noise only."""
  if mesh.devices.size == 1:
    return fn

  def local(params, examples, key):
    return fn(params, examples, jax.random.fold_in(key, jax.lax.axis_index("data")))
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P()), out_specs=P("data"))


def global_batch(mesh: Mesh, local_images: np.ndarray) -> jax.Array:
  """This process's rows of the global batch -> one global array sharded over 'data'."""
  return jax.make_array_from_process_local_data(batch_sharded(mesh), local_images)


def process_rows(indices: np.ndarray) -> np.ndarray:
  """The slice of a global batch's example indices that this process loads."""
  per = len(indices) // jax.process_count()
  return indices[jax.process_index() * per:(jax.process_index() + 1) * per]


def initialize_distributed() -> None:
  """jax.distributed.initialize() for a multi-host run. Clusters JAX detects (TPU pods, SLURM, Open MPI,
  Kubernetes...) need nothing; elsewhere JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
  and JAX_PROCESS_ID say it (JAX itself reads only the first). CPU hosts exchange gradients through gloo."""
  if jax.distributed.is_initialized():
    return
  env = {k: os.environ.get(k) for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  try:
    num = int(env["JAX_NUM_PROCESSES"]) if env["JAX_NUM_PROCESSES"] else None
    pid = int(env["JAX_PROCESS_ID"]) if env["JAX_PROCESS_ID"] else None
  except ValueError:
    raise config_lib.ConfigError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers, got {env}") from None
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(num_processes=num, process_id=pid)


def replicate(tree, mesh: Mesh):
  """A pytree (the same values on every process) -> global arrays replicated over the mesh. On one host a
  device_put; across hosts each process supplies its copy, since arrays may not be moved between processes."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x  # already a global array (restored from a checkpoint with this sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(jax.device_get(x)))
  return jax.tree_util.tree_map(put, tree)


def max_over_processes(mesh: Mesh):
  """A vote: int -> replicated int32 scalar, the largest value any process gave, dispatched asynchronously (one
  small all-reduce over the mesh). Every process must vote the same number of times, in the same order."""
  local_rows = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  largest = jax.jit(jnp.max, out_shardings=replicated(mesh))

  def vote(value: int) -> jax.Array:
    return largest(jax.make_array_from_process_local_data(batch_sharded(mesh),
                                                          np.full((local_rows,), value, np.int32)))
  return vote


def prefetch_batches(mesh: Mesh, images: np.ndarray, batch_size: int, first_step: int, seed: int,
                     size: int = 2):
  """Yields the global batch of each step from `first_step` on, sharded over the mesh's 'data' axis, each
  process loading only its rows. `size` batches are in flight ahead of the one yielded: their host-to-device
  copies are issued (asynchronously) while earlier steps compute, so a step never waits for its input."""
  queue: list = []
  step = first_step
  while True:
    while len(queue) <= size:
      idx = process_rows(data_lib.batch_indices(len(images), batch_size, step + len(queue), seed))
      queue.append(global_batch(mesh, images[idx]))
    yield queue.pop(0)
    step += 1


def gather(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host) global array -> its full value as numpy on every process."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def per_device_multiple(mesh: Mesh, batch_size: int) -> int:
  """batch_size rounded down to a multiple of the mesh's devices, at least one example per device."""
  n_dev = mesh.devices.size
  return max(n_dev, batch_size // n_dev * n_dev)
