"""Replicas of the tinyllm server behind Ray Serve: Ray's HTTP proxy, load balancing and
autoscaling in front of N copies of tinyllm's ASGI app, on one machine or a Ray cluster.

    serve run tinyllm.server.ray:app model=model.q4 replicas=2 parallel=4
    tinyllm serve model.q4 --replicas 2                 # the same, from tinyllm's CLI

Each replica is a Ray actor that loads the model and serves ``create_app`` (continuous
batching over its ``parallel`` slots); Ray's proxy spreads requests over the replicas and
each response says which one answered (``X-Tinyllm-Replica``). Nothing here is a scheduler
of our own: scaling out is Ray's (``serve.run`` on a cluster, or KubeRay's RayService).
Needs the ``ray`` extra: ``pip install 'tinyllm[ray]'``.
"""
from __future__ import annotations

from tinyllm.errors import TinyLLMError

try:
    import ray
    from ray import serve
except ImportError:  # pragma: no cover - the message is the point
    raise TinyLLMError("replicas on Ray Serve need the optional 'ray' extra: pip install 'tinyllm[ray]'") from None

__all__ = ["app", "deployment", "ray", "serve", "TinyLLMReplica"]
REPLICA_HEADER = b"x-tinyllm-replica"


def _tagged(app, replica: str):
    """``app`` with a response header naming the replica (an ASGI wrapper)."""
    value = replica.encode()

    async def tagged(scope, receive, send):
        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, value)]}
            await send(message)

        await app(scope, receive, send_tagged if scope["type"] == "http" else send)

    return tagged


@serve.deployment
@serve.ingress()
class TinyLLMReplica:
    """One replica: the model loaded in this actor, served by tinyllm's app (options as
    ``create_app``'s; ``threads``, ``n_ctx`` as ``tinyllm.load``'s)."""

    def __init__(self, model: str, parallel: int = 4, threads: int | None = None, n_ctx: int | None = None,
                 backend: str | None = None, device: str | None = None, **app_options):
        import tinyllm

        self._model = tinyllm.load(model, backend=backend, threads=threads, n_ctx=n_ctx, device=device)
        self._parallel, self._options = parallel, app_options

    def __serve_build_asgi_app__(self):
        from tinyllm.server import create_app

        replica = serve.get_replica_context().replica_id.unique_id
        # Ray's proxy is the network boundary here: any Host header it forwards is answered
        return _tagged(create_app(self._model, parallel=self._parallel, allowed_hosts=None, **self._options), replica)


def deployment(model: str, replicas: int = 2, parallel: int = 4, threads: int | None = None,
               n_ctx: int | None = None, cpus_per_replica: float = 1.0, backend: str | None = None,
               device: str | None = None, **app_options):
    """The Ray Serve application: ``replicas`` copies of the server for ``model``; each
    replica's actor reserves ``cpus_per_replica`` of Ray's CPUs (a GPU with device="cuda")."""
    if not isinstance(replicas, int) or replicas < 1:
        raise TinyLLMError(f"replicas must be a positive integer, got {replicas!r}")
    resources = {"num_cpus": cpus_per_replica, **({"num_gpus": 1} if device == "cuda" else {})}
    return TinyLLMReplica.options(num_replicas=replicas, ray_actor_options=resources).bind(
        str(model), parallel, threads, n_ctx, backend, device, **app_options)


def app(args: dict):
    """The builder `serve run tinyllm.server.ray:app model=PATH [replicas=2] [parallel=4] [threads=N]` calls."""
    if "model" not in args:
        raise TinyLLMError("serve run tinyllm.server.ray:app needs model=PATH")
    ints = {k: int(v) for k, v in args.items() if k in ("replicas", "parallel", "threads", "n_ctx")}
    floats = {k: float(v) for k, v in args.items() if k == "cpus_per_replica"}
    unknown = set(args) - {"model", *ints, *floats}
    if unknown:
        raise TinyLLMError(f"unknown argument {sorted(unknown)[0]!r}; known: model, replicas, parallel, threads, "
                           "n_ctx, cpus_per_replica")
    return deployment(args["model"], **ints, **floats)
