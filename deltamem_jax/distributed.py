"""Multi-device and multi-host runs from the command line: the flags every entry point shares.

One process per host, all running the same command (JAX's multi-controller model).
`jax.distributed.initialize` connects them before any computation: with `--coordinator`,
`--num-processes` and `--process-id` given explicitly, or with `--distributed` alone where
the cluster says who is who (TPU VM pod slices, Slurm, Open MPI). Every process then sees
every device in `jax.devices()`, owns its `jax.local_devices()`, and `--mesh DATAxMODEL`
lays them out as a (data, model) mesh (`models.sharding.make_mesh`: the data axis across
hosts, the model axis within one).
"""

from __future__ import annotations

import argparse

import jax


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices and hosts")
    g.add_argument("--mesh", help="DATAxMODEL device mesh over all processes' devices, e.g. 4x2, or auto (every device on the data axis); default: one device")
    g.add_argument("--coordinator", help="host:port of process 0; starts jax.distributed with --num-processes and --process-id")
    g.add_argument("--num-processes", type=int, help="processes in the run (one per host)")
    g.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes-1")
    g.add_argument("--distributed", action="store_true", help="start jax.distributed from the cluster's environment (TPU VM pod slices, Slurm, Open MPI)")


def initialize(args: argparse.Namespace) -> None:
    """Starts JAX's multi-controller runtime if the flags ask for it. Call before any JAX
    computation. CPU processes exchange data through gloo (JAX's CPU collectives); GPUs and
    TPUs use their own interconnect and ignore that setting."""
    explicit = [args.coordinator, args.num_processes, args.process_id]
    if any(x is not None for x in explicit) and not all(x is not None for x in explicit):
        raise SystemExit("--coordinator, --num-processes and --process-id go together")
    if not args.distributed and args.coordinator is None:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)


def mesh(args: argparse.Namespace):
    """The `--mesh` flag's mesh, or None (one device)."""
    from models.sharding import make_mesh, parse_mesh

    return None if args.mesh is None else make_mesh(*parse_mesh(args.mesh))


def is_main() -> bool:
    """True on the process that prints and writes files (process 0)."""
    return jax.process_index() == 0


__all__ = ["add_arguments", "initialize", "is_main", "mesh"]
