"""`arx serve BUNDLE --ray --replicas N`: the same server as N Ray Serve replicas.

Each replica opens the bundle and runs its own scheduler and cache (`make_server`) behind the
FastAPI app of `arx.serve.api`; Ray Serve's HTTP proxy spreads requests over the replicas. On
one machine `ray.init()` starts a local cluster; on a cluster (`ray start --head` on one
node, `ray start --address HEAD:6379` on the others) RAY_ADDRESS=HEAD:6379 makes the same
command place the replicas across the nodes, each of which must hold the bundle at the same
path (or a shared file system).
"""

from __future__ import annotations

from pathlib import Path

from ray import serve

APP = "arx"


@serve.ingress()
class Replica:
    """One replica: a session over the bundle and a started server (scheduler thread)."""

    def __init__(self, bundle: str, options: dict, backend: dict):
        from arx.runtime.backend import BackendOptions
        from arx.runtime.decoder import DecoderSession
        from arx.serve.server import make_server

        self.session = DecoderSession(bundle, BackendOptions(**backend))
        self.server = make_server(self.session, bundle, **options)

    def __serve_build_asgi_app__(self):
        from arx.serve.api import create_app

        return create_app(self.server)

    def check_health(self) -> None:
        """Ray restarts a replica whose scheduler thread died."""
        if not self.server.scheduler.alive:
            raise RuntimeError("the scheduler is not running")

    def __del__(self):
        if getattr(self, "server", None) is not None:  # not when __init__ failed
            self.server.scheduler.close()
            self.session.__exit__(None, None, None)


def application(bundle: str | Path, *, replicas: int, options: dict, backend: dict,
                cpus: float = 1.0):
    """The bound Ray Serve application: `replicas` copies of Replica over the bundle."""
    deployment = serve.deployment(Replica, name="arx_replica", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": cpus})
    return deployment.bind(str(Path(bundle).resolve()), options, backend)


def run(bundle: str | Path, *, host: str, port: int, replicas: int, options: dict,
        backend: dict, cpus: float = 1.0, blocking: bool = True) -> None:
    """Start (or join, with RAY_ADDRESS) a Ray cluster and serve until Ctrl-C."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(bundle, replicas=replicas, options=options, backend=backend,
                          cpus=cpus), name=APP, route_prefix="/", blocking=blocking)


def shutdown() -> None:
    """Stop the application and leave Ray (a local cluster this process started ends too)."""
    import ray

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
