"""Subprocess side of tests/test_sharding.py (run as a script, never collected).

``python tests/_multihost_worker.py devices OUT.npz``
    in a process started with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``:
    the Krylov prediction on all four CPU devices and on a one-device mesh, and
    the dense kernel's rows on the four devices (with where each row block lives).

``python tests/_multihost_worker.py process OUT.npz PORT PROCESS_ID NUM_PROCESSES``
    one process of a CPU job joined by ``jax.distributed.initialize`` (gloo
    collectives): the same prediction on the global mesh, and the kernel rows
    gathered from every process.

Both write their arrays to OUT.npz for the test to compare.
"""

import sys

import numpy as np

N_TRAIN, N_TEST, WIDTH = 30, 7, 16
TIMES = (1.0, 10.0, 100.0)


def problem():
    """The shared float32 problem: an MLP with K = 2 and inputs the mesh does not divide (padding is exercised)."""
    import jax.numpy as jnp

    from ntkdyn import models

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_TRAIN, 4)).astype(np.float32)
    x_test = rng.normal(size=(N_TEST, 4)).astype(np.float32)
    y = np.tanh(x[:, :2]).astype(np.float32)
    f, p = models.mlp(4, 2, width=WIDTH, depth=1, dtype=jnp.float32)
    return f, p, x, y, x_test


def prediction(mesh):
    """Arrays of one Krylov prediction (weights flattened), as NumPy, plus its iteration count."""
    import jax
    from jax.flatten_util import ravel_pytree

    import ntkdyn

    f, p, x, y, x_test = problem()
    pred = ntkdyn.predict(p, x, y, np.asarray(TIMES, np.float32), apply_fn=f, x_test=x_test, weights=True,
                          solver="krylov", mesh=mesh, tile_size=4, tol=1e-5)
    local = lambda a: np.asarray(a.addressable_data(0))  # noqa: E731  (replicated: every copy is the whole array)
    weights = np.stack([ravel_pytree(jax.tree_util.tree_map(lambda a: local(a)[i], pred.params))[0]
                        for i in range(len(TIMES))])
    return dict(fx_train=local(pred.fx_train), fx_test=local(pred.fx_test), weights=weights,
                estimate=local(pred.error_estimate), iterations=local(pred.iterations),
                converged=local(pred.krylov_info.converged))


def devices(out: str) -> None:
    import jax
    from jax.sharding import Mesh

    import ntkdyn

    assert jax.device_count() == 4, jax.devices()
    everywhere = prediction(Mesh(np.asarray(jax.devices()), ("data",)))
    one = prediction(Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    f, p, x, _, _ = problem()
    rows = x[:28]  # a multiple of the device count: the kernel stays split
    kernel = ntkdyn.empirical_ntk(f, p, rows, mesh=Mesh(np.asarray(jax.devices()), ("data",)), tile_size=3)
    blocks = sorted((shard.device.id, shard.index[0].start or 0, shard.data.shape[0])
                    for shard in kernel.addressable_shards)
    np.savez(out, **{f"all_{k}": v for k, v in everywhere.items()}, **{f"one_{k}": v for k, v in one.items()},
             kernel=np.asarray(kernel), blocks=np.asarray(blocks), spec=str(kernel.sharding.spec),
             reference_kernel=np.asarray(ntkdyn.empirical_ntk(f, p, rows)))


def process(out: str, port: str, process_id: str, num_processes: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(num_processes),
                               process_id=int(process_id))
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh

    import ntkdyn

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    assert jax.process_count() == int(num_processes) and mesh.size == jax.device_count()
    result = prediction(mesh)
    f, p, x, _, _ = problem()
    kernel = ntkdyn.empirical_ntk(f, p, x[:28], mesh=mesh, tile_size=3)
    local_rows = sum(shard.data.shape[0] for shard in kernel.addressable_shards)
    gathered = multihost_utils.process_allgather(kernel, tiled=True)
    np.savez(out, **result, kernel=np.asarray(gathered), local_rows=local_rows)
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"devices": devices, "process": process}[mode](*args)
