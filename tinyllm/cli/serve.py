"""`tinyllm serve`: the OpenAI-compatible HTTP API and the web chat page."""
from __future__ import annotations

import click

from tinyllm.cli import main
from tinyllm.cli.options import load_model, model_argument, runtime_options
from tinyllm.templates import BUILTIN

DEFAULT_PARALLEL = 4  # decode steps of 4 cost about 1.6x one on 2 cores (BENCHMARKS.md, continuous batching)


@main.command()
@model_argument
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. The default is reachable from this machine only; 0.0.0.0 exposes the server.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="TCP port.")
@click.option("--api-key", default=None, envvar="TINYLLM_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/ (also from $TINYLLM_API_KEY).")
@click.option("--parallel", "-np", type=click.IntRange(min=1, max=256), default=None,
              help="Requests decoded at once, batched into shared forward passes, each in a KV cache slot of "
                   "its own (default: 4, fewer if their KV caches would take over half the free memory; "
                   "1 with --device cuda).")
@click.option("--replicas", type=click.IntRange(min=1, max=1024), default=None,
              help="Run N copies of the server behind Ray Serve's HTTP proxy (needs the 'ray' extra; "
                   "on a Ray cluster when RAY_ADDRESS is set).")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests that may wait while every slot is busy; more get HTTP 503.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Most tokens one request may generate (default: the context length).")
@click.option("--template", default=None,
              help=f"Chat template: {', '.join(BUILTIN)}, or a Jinja file "
                   "(default: the model's own; plain if it has none).")
@click.option("--model-id", default=None, help="Model name clients send (default: the file name without extension).")
@click.option("--timeout", type=click.FloatRange(min=0.1, max=3600), default=30, show_default=True,
              help="Seconds a client may take to send a request's headers, and again its body.")
@click.option("--max-connections", type=click.IntRange(min=1, max=10000), default=128, show_default=True,
              help="Open connections at most; more are closed on arrival.")
@runtime_options
def serve(model, host, port, api_key, parallel, replicas, max_queue, max_tokens, template, model_id, timeout,
          max_connections, backend, threads, n_ctx, device):
    """Serve MODEL over an OpenAI-compatible API, with a chat page at /.

    With no MODEL: the cached SmolLM2 chat model, else the bundled story model.
    """
    from tinyllm.errors import TinyLLMError
    from tinyllm.server import create_app
    from tinyllm.server.guards import LOOPBACK_HOSTS
    from tinyllm.server.http import listen, serve_app

    if api_key is not None and not api_key.strip():
        raise TinyLLMError("--api-key is empty: give a key, or leave the option out for no authentication")
    loopback = host in LOOPBACK_HOSTS
    m = load_model(model, backend, threads, n_ctx, device)
    if parallel is None:
        from tinyllm.batching import default_slots

        parallel = default_slots(m, DEFAULT_PARALLEL)
    if replicas:
        _serve_on_ray(m, replicas, parallel, host, port, threads, n_ctx, backend, device, api_key=api_key,
                      max_queue=max_queue, max_tokens=max_tokens, model_id=model_id, chat_template=template,
                      timeout=timeout)
        return
    sock = listen(host, port)  # a used port fails here, before the banner
    port = sock.getsockname()[1]
    app = create_app(m, api_key=api_key, max_queue=max_queue, max_tokens=max_tokens, model_id=model_id,
                     chat_template=template, allowed_hosts=LOOPBACK_HOSTS if loopback else None, timeout=timeout,
                     parallel=parallel)
    service = app.state.service
    model_id = service.model_id
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"Serving {model_id} (context {m.n_ctx}, template {service.template.name}, {parallel} "
               f"{'slot' if parallel == 1 else 'parallel slots'}) at http://{shown}:{port}/  "
               f"(OpenAI API at http://{shown}:{port}/v1{', API key required' if api_key else ''}). Ctrl-C stops.",
               err=True)
    if not loopback and not api_key:
        click.secho(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model",
                    err=True, fg="yellow")
    serve_app(app, sock, timeout=timeout, max_connections=max_connections)


def _serve_on_ray(m, replicas, parallel, host, port, threads, n_ctx, backend, device, **app_options):
    """``replicas`` copies of the server for the (already checked) model ``m``, behind Ray
    Serve's proxy at host:port, until Ctrl-C."""
    import os
    import time

    from tinyllm.server.ray import deployment, ray, serve  # a clear error without the 'ray' extra

    # a cluster when RAY_ADDRESS names one, else a fresh Ray instance on this machine
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(m.path, replicas, parallel, threads, n_ctx, backend=backend, device=device,
                             **app_options), name="tinyllm", route_prefix="/")
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"Serving {app_options.get('model_id') or m.name} on {replicas} Ray Serve replicas "
                   f"({parallel} slots each) at http://{shown}:{port}/ (OpenAI API at /v1). Ctrl-C stops.", err=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
