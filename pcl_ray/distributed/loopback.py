"""Keep a local run's network services on 127.0.0.1.

Two pieces, both used only when this process starts its own Ray (never with ``ray.address``):

- :func:`loopback_only` makes the Ray instance about to start listen on the loopback address: Ray
  binds its gRPC servers (GCS, raylet, object manager, workers) and agents to the loopback address
  when the node's IP is the loopback address, which it picks when multi-node clusters are switched
  off (Ray's own default on macOS and Windows).
- :class:`LoopbackTorchConfig` is Ray Train's torch backend with one change: on a node whose IP is the
  loopback address, rank 0 serves torch.distributed's rendezvous store (a ``TCPStore``) from a socket
  bound to 127.0.0.1. torch's own ``env://`` rendezvous binds that store to every interface and has
  no bind-address option; ``TCPStore(master_listen_fd=...)`` takes a socket bound beforehand. gloo's
  own connections and NCCL's bootstrap go through the loopback interface (``GLOO_SOCKET_IFNAME`` /
  ``NCCL_SOCKET_IFNAME``, unless set; the NCCL path is untested here, no GPU). On any other node (a
  real cluster) it is Ray's backend unchanged.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"
_STORE = {}  # rank 0's store server (and its socket), alive for the worker's lifetime


def loopback_only() -> None:
    """Make the local Ray instance about to start listen on 127.0.0.1 only.

    The processes Ray starts read the switch from the environment; this driver has imported Ray
    already, so its constant is set as well.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _serve_store(world_size: int, timeout_s: float) -> int:
    """On rank 0: a TCPStore server on a fresh 127.0.0.1 port; returns the port."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen()
    port = sock.getsockname()[1]
    store = dist.TCPStore(LOOPBACK, port, world_size, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=sock.fileno())
    _STORE.update(store=store, socket=sock)
    return port


def _init_process_group(backend: str, world_rank: int, world_size: int, port: int, timeout_s: float) -> None:
    import torch.distributed as dist

    if backend == "nccl":  # as Ray Train does: fail on a hung collective instead of waiting forever
        if "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    # gloo's pairs listen on the address the host name resolves to, and NCCL's bootstrap on the first
    # non-loopback interface, unless told the interface
    ifname_var = {"gloo": "GLOO_SOCKET_IFNAME", "nccl": "NCCL_SOCKET_IFNAME"}[backend]
    if ifname_var not in os.environ:
        names = {name for _, name in socket.if_nameindex()}
        ifname = next((n for n in ("lo", "lo0") if n in names), None)
        if ifname:
            os.environ[ifname_var] = ifname
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = LOOPBACK, str(port)
    timeout = timedelta(seconds=timeout_s)
    store = _STORE["store"] if world_rank == 0 else dist.TCPStore(LOOPBACK, port, world_size, False, timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        import ray

        if not is_loopback(worker_group.execute_single(0, _node_ip)):
            return super().on_start(worker_group, backend_config)
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        if backend not in ("gloo", "nccl"):
            return super().on_start(worker_group, backend_config)
        world = len(worker_group)
        timeout = float(backend_config.timeout_s)
        port = worker_group.execute_single(0, _serve_store, world_size=world, timeout_s=timeout)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _init_process_group, backend=backend, world_rank=i, world_size=world,
                                                   port=port, timeout_s=timeout) for i in range(world)])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """Ray Train's :class:`TorchConfig`, with the rendezvous store on 127.0.0.1 on a loopback node."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
