"""Ray Serve: N replicas of the server behind one OpenAI endpoint, each adapter's requests
routed to the replicas that already hold it.

    client -> Ray's HTTP proxy -> LoraplexIngress --(multiplexed_model_id = adapter)--> replica
                                                                                        |
                                          build_state + build_app (the `loraplex serve` app)

Each replica runs the whole `loraplex serve` application in-process (routes, keys, tenants,
error shapes, streaming): the ingress forwards the ASGI request and streams back the ASGI
messages, so no route is written twice. Ray's model multiplexing does the affinity: the
ingress names the adapter as the request's multiplexed model id, a replica reports the
adapters it has loaded, and Ray's router prefers those replicas (and, for an adapter nobody
holds, the replica holding the fewest). The base model is not multiplexed: any replica.

Replicas share one adapter store (a shared path). An upload, replacement or delete through
one replica reaches the others at the adapter's next request (`ServerState.sync_from_store`).
Each replica pushes its Prometheus exposition to a small named actor every PUSH_EVERY_S; the
ingress's /metrics serves them all with a `replica` label, behind the same metrics key.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import signal
import sys
import threading
import time

import ray
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .auth import Keyring, authorize
from .config import RayOptions, ServerConfig
from .protocol import APIError
from .runner.loader import served_name
from .state import read_capped

log = logging.getLogger("loraplex.ray")

APP_NAME = "loraplex"
NAMESPACE = "loraplex"
DIRECTORY = "loraplex-metrics"
PUSH_EVERY_S = 2.0
# A replica silent this long is gone (killed, or replaced after a crash): its series leave.
STALE_AFTER_S = 15.0
# Tries on other replicas when the chosen one dies before answering.
RETRIES = 2
REPLICA_HEADER = b"x-loraplex-replica"
# No access log per request, as `loraplex serve` (uvicorn at warning level) has none.
QUIET = {"enable_access_log": False, "log_level": "WARNING"}
# What a replica needs of the request's ASGI scope (the rest belongs to the ingress's process).
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path",
               "root_path", "query_string", "headers", "client", "server")
# Routes whose body names an adapter in "model".
_INFERENCE = ("/v1/chat/completions", "/v1/completions")
_ADAPTER_ROUTE = "/v1/adapters/"


@ray.remote(num_cpus=0)
class MetricsDirectory:
    """The replicas' latest expositions, named and anonymous, by replica id."""

    def __init__(self):
        self.texts: dict[str, tuple[float, bytes, bytes]] = {}

    def put(self, replica: str, named: bytes, anonymous: bytes) -> None:
        self.texts[replica] = (time.monotonic(), named, anonymous)

    def get(self, names_visible: bool) -> dict[str, bytes]:
        now = time.monotonic()
        self.texts = {r: v for r, v in self.texts.items() if now - v[0] < STALE_AFTER_S}
        return {r: v[1] if names_visible else v[2] for r, v in self.texts.items()}


def _directory():
    return MetricsDirectory.options(name=DIRECTORY, namespace=NAMESPACE, get_if_exists=True,
                                    lifetime="detached", max_restarts=-1).remote()


def merge_expositions(texts: dict[str, bytes]) -> bytes:
    """One exposition from several, each series labelled with its `replica`."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type))
            merged.samples += [s._replace(labels={**s.labels, "replica": replica})
                               for s in family.samples]

    class Merged:
        def collect(self):
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


class LoraplexReplica:
    """One `loraplex serve` application: an engine over the base model and the shared store."""

    def __init__(self, config: ServerConfig, max_adapters: int):
        from .app import build_app
        from .serve import build_state

        self.state = build_state(config)
        self.app = build_app(self.state)
        self.id = serve.get_replica_context().replica_id.unique_id
        # Ray's routing table of the adapters this replica holds, LRU over the host cache's
        # capacity (beyond it the engine would read the adapter from disk again anyway).
        async def hold(name: str) -> str:
            return name  # the engine loads the adapter itself, into the tier it belongs in

        # (A plain function: Ray keeps its LRU on the decorated function's attributes.)
        self.hold = serve.multiplexed(max_num_models_per_replica=max_adapters)(hold)
        self._directory = _directory()
        threading.Thread(target=self._push_metrics, name="loraplex-metrics-push",
                         daemon=True).start()

    def _push_metrics(self) -> None:
        while self.state.engine.alive:
            metrics = self.state.metrics
            try:
                ray.get(self._directory.put.remote(self.id, metrics.render(True),
                                                   metrics.render(False)))
            except RayError:  # the directory restarts with the next push
                log.warning("replica %s: metrics push failed", self.id, exc_info=True)
                self._directory = _directory()
            time.sleep(PUSH_EVERY_S)

    def check_health(self) -> None:
        """Ray restarts a replica whose engine thread died."""
        if not self.state.engine.alive:
            raise RuntimeError("the engine is not running")

    async def forward(self, scope: dict, body: bytes, adapter: str, hold: bool):
        """Run one HTTP request through the app; yields its ASGI messages as they are sent.
        `adapter`: the adapter the request names, if any; `hold`: report it to Ray's router
        as held here (affinity on)."""
        if adapter:
            await self.state.sync_from_store(adapter)
            if hold and adapter in self.state.engine.engine.adapters:
                await self.hold(adapter)  # unknown names never enter Ray's routing table
        elif scope["method"] == "GET" and scope["path"] in ("/v1/models", "/v1/adapters"):
            await self.state.sync_all_from_store()
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if gone.is_set():  # ASGI's way to tell a streaming app its client left
                raise OSError("the client disconnected")
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (REPLICA_HEADER, self.id.encode())]}
            await messages.put(message)

        async def run():
            try:
                await self.app(dict(scope), receive, send)
            finally:
                messages.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while (message := await messages.get()) is not None:
                yield message
        finally:
            gone.set()  # the ingress stopped reading (its client left): the app aborts
            # The app answers its own errors; what is left is the OSError of a client gone.
            await asyncio.gather(task, return_exceptions=True)

    def __del__(self):
        state = getattr(self, "state", None)
        if state is not None:
            state.engine.shutdown()


class _Forwarded(Response):
    """A replica's ASGI messages, sent on as they come; `done` runs when the response ends."""

    def __init__(self, start: dict, stream, done):
        self.start, self.stream, self.done = start, stream, done
        self.status_code = start["status"]
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        more = True
        try:
            await send(self.start)
            async for message in self.stream:
                await send(message)
                more = message.get("more_body", False)
        except RayError as e:
            log.warning("replica lost mid-response: %r", e)
            if more and _is_event_stream(self.start):
                # The OpenAI SDKs raise an APIError on an `error` event.
                error = APIError(503, "the replica serving this request stopped; retry",
                                 None, "replica_unavailable").body()
                await send({"type": "http.response.body",
                            "body": f"data: {json.dumps(error)}\n\n".encode(),
                            "more_body": False})
                return
        finally:
            if more:  # the client left, or the replica did: stop the replica's work
                self.stream.cancel()
            self.done()
        if more:  # a truncated body; the client sees the connection end early
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _is_event_stream(start: dict) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
               for k, v in start.get("headers", ()))


def affine(in_flight: collections.Counter, adapter: str, num_replicas: int) -> bool:
    """Whether to send a request for `adapter` to the replicas holding it, given the requests
    in flight by adapter. A hot adapter spills: once it alone has a replica's share of the
    requests in flight, its next one goes to the least loaded replica, which then holds it
    too (Ray routes among all the replicas holding an adapter), so one popular adapter
    cannot leave the other replicas idle."""
    if not adapter:
        return False
    share = sum(in_flight.values()) / num_replicas
    return in_flight[adapter] < max(1.0, share)


class LoraplexIngress:
    """The one HTTP endpoint: forwards every request to a replica, picked by adapter."""

    def __init__(self, replicas, config: ServerConfig, opts: RayOptions):
        self.replicas = replicas
        self.base = config.served_model_name or served_name(config.engine.model)
        self.keyring = Keyring.load(config.admin_key, config.api_key, config.tenant_keys,
                                    config.metrics_key)
        self.affinity = opts.affinity
        self.num_replicas = opts.num_replicas
        # The replica refuses oversized bodies itself; these bound what is buffered here.
        self.max_body = int(config.max_body_mb * 2**20)
        self.max_upload = int((config.max_adapter_mb + 2) * 2**20)
        self.in_flight: collections.Counter[str] = collections.Counter()  # by adapter ("": base)
        self._directory = _directory()

    def _adapter(self, request: Request, body: bytes) -> str:
        """The adapter a request names: "model" in an inference body, or the admin route's
        name; "" for the base model, listings and anything unparsable."""
        path = request.url.path
        if path in _INFERENCE and request.method == "POST":
            try:
                model = json.loads(body).get("model")
            except (ValueError, AttributeError, RecursionError):
                return ""  # the replica answers 400
            return model if isinstance(model, str) and model != self.base else ""
        if path.startswith(_ADAPTER_ROUTE) and not path.endswith("/compose"):
            name = path[len(_ADAPTER_ROUTE):]
            return name.rsplit("/", 1)[0] if name.endswith(("/pin", "/unpin", "/merge")) \
                else name
        return ""


    async def __call__(self, request: Request) -> Response:
        try:
            # Keys are checked here as well as by the replica, so that nobody without one
            # has a body buffered or names an adapter to the router.
            principal = authorize(self.keyring, request.url.path,
                                  request.headers.get("authorization"))
            if request.url.path == "/metrics":
                texts = await self._directory.get.remote(principal.patterns != ())
                return Response(merge_expositions(texts), media_type=CONTENT_TYPE_LATEST)
            body = await self._body(request)
        except APIError as e:
            return _error(e)
        adapter = self._adapter(request, body)
        hold = self.affinity and affine(self.in_flight, adapter, self.num_replicas)
        scope = {k: request.scope[k] for k in _SCOPE_KEYS if k in request.scope}
        handle = self.replicas.options(stream=True, multiplexed_model_id=adapter if hold else "")
        # Retried on another replica only where running twice is harmless.
        tries = 1 + RETRIES * (request.method in ("GET", "HEAD") or
                               request.url.path in _INFERENCE)
        self.in_flight[adapter] += 1
        handed = False  # to a response, which ends the count itself
        try:
            for attempt in range(tries):
                stream = handle.forward.remote(scope, body, adapter, hold)
                try:
                    start = await stream.__anext__()
                except (RayActorError, ActorUnavailableError) as e:
                    log.warning("replica lost before answering (try %d of %d): %r",
                                attempt + 1, tries, e)
                    stream.cancel()  # unavailable may still be running it
                    continue
                except BackPressureError:
                    return _error(APIError(503, "the server is at capacity; retry shortly",
                                           None, "queue_full", headers={"Retry-After": "1"}))
                except RayError as e:
                    log.error("replica failed: %r", e)
                    return _error(APIError(500, f"internal error: {type(e).__name__}"))
                handed = True
                return _Forwarded(start, stream, self._done(adapter))
            return _error(APIError(503, "no replica could take the request; retry shortly",
                                   None, "replica_unavailable", headers={"Retry-After": "5"}))
        finally:
            if not handed:
                self._done(adapter)()

    def _done(self, adapter: str):
        def done():
            self.in_flight[adapter] -= 1
            if not self.in_flight[adapter]:
                del self.in_flight[adapter]
        return done

    async def _body(self, request: Request) -> bytes:
        upload = request.method == "POST" and request.url.path == "/v1/adapters"
        return await read_capped(request, self.max_upload if upload else self.max_body)


def _error(e: APIError) -> Response:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_application(config: ServerConfig, opts: RayOptions):
    """The Ray Serve application: the ingress bound to N replicas."""
    lora = config.engine.lora
    config = dataclasses.replace(config, shared_store=True)
    replica = serve.deployment(
        LoraplexReplica, name="LoraplexReplica", num_replicas=opts.num_replicas,
        ray_actor_options={"num_cpus": opts.cpus_per_replica,
                           "num_gpus": opts.gpus_per_replica},
        # The server sheds load itself (503 past --max-in-flight); Ray's default of 5 would
        # cap each engine's batch.
        max_ongoing_requests=config.max_in_flight,
        # Past this many waiting in Ray's router the ingress answers 503 queue_full.
        max_queued_requests=config.max_in_flight,
        graceful_shutdown_timeout_s=config.drain_timeout,
        health_check_period_s=5, logging_config=QUIET)
    ingress = serve.deployment(
        LoraplexIngress, name="LoraplexIngress", ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.max_in_flight * opts.num_replicas, logging_config=QUIET)
    return ingress.bind(replica.bind(config, lora.max_cpu_loras or lora.max_loras),
                        config, opts)


def app_builder(args: dict):
    """For `serve run loraplex.server.ray_serve:app_builder key=value ...` or a Serve config
    file's `args`: the keys are `loraplex serve-ray` flags without their dashes."""
    from .cli import build_parser, config_from_args, ray_options

    argv = ["serve-ray"]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    try:
        parsed = build_parser().parse_args(argv)
        return build_application(config_from_args(parsed), ray_options(parsed))
    except (SystemExit, AssertionError) as e:  # argparse has printed why
        raise ValueError(f"args {args}: not valid `loraplex serve-ray` flags: {e}") from None


def _say(message: str) -> None:
    print(f"[loraplex] {message}", file=sys.stderr, flush=True)


def serve_ray(config: ServerConfig, opts: RayOptions) -> int:
    """`loraplex serve-ray`: the application on a local Ray cluster (or `--ray-address`'s),
    until SIGINT or SIGTERM."""
    if config.engine.model.model is None or config.engine.model.model.endswith(".gguf"):
        from .runner.loader import convert_gguf, embedded_gguf_path

        convert_gguf(config.engine.model.model or embedded_gguf_path(),
                     config.engine.model.cache_dir)  # once, before N replicas want it
    ray.init(address=opts.address, namespace=NAMESPACE, log_to_driver=True)
    _say(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, "
         f"{ray.cluster_resources().get('GPU', 0):g} GPUs in the cluster")
    serve.start(http_options={"host": config.host, "port": config.port})
    _say(f"starting {opts.num_replicas} replicas "
         f"({'adapter affinity' if opts.affinity else 'no adapter affinity'}) ...")
    serve.run(build_application(config, opts), name=APP_NAME, route_prefix="/")
    host = "localhost" if config.host in ("0.0.0.0", "::") else config.host
    _say(f"serving at http://{host}:{config.port}/v1 (Ray Serve)")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    _say("stopping ...")
    serve.delete(APP_NAME)
    try:
        ray.kill(ray.get_actor(DIRECTORY, namespace=NAMESPACE))
    except ValueError:
        pass
    ray.shutdown()
    _say("stopped")
    return 0

