"""Adapters built from several served ones (adapters/compose.py does the math): stored under a
name by an operator (`POST /v1/adapters/{name}/compose`), or asked for per request, as LoRAX's
`merged_adapters`: a completions body with `"adapters": [{"name", "weight"}]` (and optionally
`method`, `density`, `rank`, `t`, `majority_sign_method`) is served by the mixture of them.

A per-request mixture is built once per content: its name, `[tenant/]mix-<16 hex>`, is a hash of
its sources' file digests, weights and method, so a repeated mix finds the adapter already
stored and served (by this server or, through a shared store, by another replica). Mixtures
count against `--max-mixes` per tenant; past it the tenant's least recently used one is
deleted. A mixture is named under the caller's tenant (none for shared and admin keys, which
count as one tenant). The name shape is reserved: no upload, compose or --lora-modules name
may take it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters.compose import METHODS, NEEDS_DENSITY, Source, compose_peft, compose_slerp
from loraplex.adapters.peft_format import AdapterError
from loraplex.adapters.validate import MIX_NAME, check_name
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..protocol import APIError
from ..state import ServerState
from .admin import check_store_serve, describe, json_body, refuse, remove, store_full

log = logging.getLogger("loraplex.compose")

MAX_SOURCES = 16
MAX_WEIGHT = 1000  # fp32 deltas stay finite: an overflow to inf would break the SVD


@dataclass(frozen=True)
class Spec:
    """How to build one adapter from served ones (PEFT's add_weighted_adapter arguments)."""

    sources: tuple[Source, ...]
    method: str
    density: float | None
    rank: int | None
    t: float  # slerp only
    seed: int  # DARE's random draws
    majority_sign_method: str

    def digest(self, files: Mapping[str, str]) -> str:
        """The hash of what the result depends on: each source's file digest (`files`, by
        name) and weight, and every argument."""
        parts = {"sources": [[files.get(s.name, str(s.path)), s.weight] for s in self.sources],
                 "method": self.method, "density": self.density, "rank": self.rank,
                 "t": self.t if self.method == "slerp" else None, "seed": self.seed,
                 "majority_sign_method": self.majority_sign_method}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _number(value: Any, lo: float, hi: float) -> bool:
    # Compared, not converted first: a 400-digit integer is no float.
    return not isinstance(value, bool) and isinstance(value, (int, float)) and lo <= value <= hi


def parse_spec(state: ServerState, sources: Any, options: dict, param: str,
               default_method: str, seed: Any = 0) -> Spec:
    """A Spec from a request's JSON, or a 4xx naming the field at fault (`param` for the
    sources). Sources must be served adapters."""
    method = options.get("method", default_method)
    if method not in METHODS:
        raise APIError(400, f"method must be one of {', '.join(METHODS)}", "method")
    if (not isinstance(sources, list) or not 1 <= len(sources) <= MAX_SOURCES
            or not all(isinstance(s, dict) for s in sources)):
        raise APIError(400, f"{param} must be a list of 1 to {MAX_SOURCES} objects "
                            f"{{name, weight}}", param)
    served = state.engine.engine.adapters
    picked = []
    for s in sources:
        name, weight = s.get("name"), s.get("weight", 1.0)
        if not isinstance(name, str) or name not in served:
            raise APIError(404, f"adapter {name!r} not found", param, "model_not_found")
        if not _number(weight, -MAX_WEIGHT, MAX_WEIGHT):
            raise APIError(400, f"each source's weight must be a number in [-{MAX_WEIGHT}, "
                                f"{MAX_WEIGHT}]", param)
        picked.append(Source(name, Path(served[name].path), float(weight)))
    density, rank = options.get("density"), options.get("rank")
    t = options.get("t", 0.5)
    sign = options.get("majority_sign_method", "total")
    max_rank = state.engine.engine.config.lora.max_lora_rank
    if method == "cat" and sum(served[s.name].max_rank for s in picked) > max_rank:
        raise APIError(400, f"cat: the sources' ranks add up to "
                            f"{sum(served[s.name].max_rank for s in picked)}, which exceeds "
                            f"--max-lora-rank {max_rank}; choose a method with a rank",
                       "method")
    if method in NEEDS_DENSITY:
        if not _number(density, 0, 1) or density == 0:
            raise APIError(400, f"{method} needs a density in (0, 1]", "density")
    elif density is not None:
        raise APIError(400, f"{method} takes no density", "density")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)
                             or not 1 <= rank <= max_rank):
        raise APIError(400, f"rank must be an integer in [1, {max_rank}]", "rank")
    if not _number(t, 0, 1):
        raise APIError(400, "t must be a number in [0, 1]", "t")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise APIError(400, "seed must be a non-negative 64-bit integer", "seed")
    if sign not in ("total", "frequency"):
        raise APIError(400, "majority_sign_method must be total or frequency",
                       "majority_sign_method")
    return Spec(tuple(picked), method, None if density is None else float(density), rank,
                float(t), seed, sign)


async def build_and_serve(state: ServerState, name: str, spec: Spec, source: str) -> None:
    """Build `spec` into a staging directory, then check, store and serve it as `name`, or
    refuse with nothing changed."""
    engine = state.engine.engine

    def build(staged: Path) -> None:
        if spec.method == "slerp":
            if len(spec.sources) != 2:
                raise AdapterError("slerp: exactly two sources")
            adapters = [engine.read_fp32(s.name, str(s.path)) for s in spec.sources]
            compose_slerp(adapters, spec.t, spec.rank, staged, engine.loaded.name)
        else:
            compose_peft(spec.sources, spec.method, staged, engine.runner.lora.module_shapes,
                         density=spec.density, rank=spec.rank, seed=spec.seed,
                         majority_sign_method=spec.majority_sign_method)

    with state.store.staging() as staged:
        try:
            with store_full():
                await run_in_threadpool(build, staged)
        except AdapterError as e:
            raise refuse(e) from None
        except FileNotFoundError:  # a source deleted or replaced while it was read
            raise APIError(409, "a source adapter changed while the new one was built; "
                                "try again", "sources", "adapter_busy") from None
        await check_store_serve(state, name, staged, source)


async def compose(request: Request) -> Response:
    """`{"sources": [{"name", "weight"}], "method", "density", "rank", "t", "seed",
    "majority_sign_method"}`: a new adapter `name` built from served adapters (PEFT's
    add_weighted_adapter, or SLERP), checked, stored and served like an upload."""
    state, name = request.app.state.loraplex, request.path_params["name"]
    body = await json_body(request, state)
    try:
        check_name(name, state.served_model_name)  # before any work
    except AdapterError as e:
        raise refuse(e) from None
    spec = parse_spec(state, body.get("sources"), body, "sources", "svd", body.get("seed", 0))
    await build_and_serve(state, name, spec, "compose")
    return JSONResponse(await describe(state, name), status_code=201)


def is_mixture(name: str) -> bool:
    return MIX_NAME.match(name) is not None


def note_use(state: ServerState, adapter: str | None) -> None:
    """A request for `adapter`, by its mixture or by name: the eviction order's clock."""
    if adapter is not None and is_mixture(adapter):
        state.mix_used[adapter] = time.monotonic()


# ---- per-request mixtures ------------------------------------------------------------------

MIX_OPTIONS = ("method", "density", "rank", "t", "majority_sign_method")


async def mixture(state: ServerState, request: Request, body: dict) -> str | None:
    """The adapter that serves a completions body's `adapters` (built and stored at its first
    request), or None when the body names none. Each source must be one the caller may use;
    the mixture's own name needs no such check."""
    sources = body.get("adapters")
    if sources is None:
        stray = [k for k in MIX_OPTIONS if body.get(k) is not None]
        if stray:
            raise APIError(400, f"{stray[0]} applies to a mixture of 'adapters' only", stray[0])
        return None
    if state.max_mixes == 0:
        raise APIError(400, "per-request mixtures are off on this server (--max-mixes 0)",
                       "adapters")
    if body.get("model") not in (None, "", state.served_model_name):
        raise APIError(400, f"with 'adapters', 'model' must be the base model's name "
                            f"({state.served_model_name!r})", "model")
    if isinstance(sources, list):
        for s in sources:  # unknown and forbidden alike: a name the caller cannot see
            if isinstance(s, dict) and isinstance(s.get("name"), str) \
                    and not state.may_use(request, s["name"]):
                raise APIError(404, f"adapter {s['name']!r} not found", "adapters",
                               "model_not_found")
    # PEFT's plain sum of the weighted deltas by default; DARE's draws are seeded with 0, so
    # the same body always means the same adapter (the compose route takes other seeds).
    spec = parse_spec(state, sources, body, "adapters", "cat")
    files = {n: info.sha256 for n, info in state.adapter_info.items()}
    # Named under the caller's tenant: a mixture is the caller's, whoever owns its sources.
    tenant = state.principal(request).tenant
    prefix = f"{tenant}/" if tenant and MIX_NAME.match(f"{tenant}/mix-{'0' * 16}") else ""
    name = f"{prefix}mix-{spec.digest(files)[:16]}"
    # One build at a time, server-wide: a repeated mix waits for the first build and finds
    # it; builds cannot crowd the CPU or evict each other's results.
    async with state.mix_lock:
        if name not in state.engine.engine.adapters:
            await state.sync_from_store(name)  # built earlier, or by another replica
        if name not in state.engine.engine.adapters:
            t0 = time.monotonic()
            await build_and_serve(state, name, spec, "mix")
            log.info("mixture %s built from %s (%s) in %.1fs", name,
                     ", ".join(f"{s.name}*{s.weight:g}" for s in spec.sources), spec.method,
                     time.monotonic() - t0)
        note_use(state, name)  # the newest: never the one evicted below
        await _evict(state, prefix)
    return name


async def _evict(state: ServerState, prefix: str) -> None:
    """Delete the least recently used mixtures under `prefix` (a tenant's, or none) past
    --max-mixes, with mix_lock held: one tenant's mixtures never push out another's.
    Requests running on one finish first, as for any delete. A failure is logged, never the
    caller's: its own mixture is served."""
    mixes = [n for n in state.engine.engine.adapters if is_mixture(n)
             and n.startswith(prefix) and ("/" in n) == bool(prefix)
             and getattr(state.adapter_info.get(n), "source", None) == "mix"]
    excess = len(mixes) - state.max_mixes
    for name in sorted(mixes, key=lambda n: state.mix_used.get(n, 0.0))[:max(excess, 0)]:
        try:
            await remove(state, name)
        except Exception:  # noqa: BLE001 - e.g. deleted meanwhile through the admin API
            log.exception("mixture %s: could not delete it", name)
            continue
        state.mix_used.pop(name, None)
        log.info("mixture %s deleted (--max-mixes %d)", name, state.max_mixes)


routes = [Route("/v1/adapters/{name:path}/compose", compose, methods=["POST"])]
