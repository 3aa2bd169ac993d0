"""Workloads: when requests arrive, which adapter each one asks for, how long it is.

A `WorkloadSpec` plus its seed fixes every request exactly, so loraplex and the PEFT baseline
(or two runs a week apart) see the same traffic. Each knob is a small object with one method,
built from a short command-line form:

    arrivals    poisson | gamma:<burstiness> | closed   (with --rate / --concurrency)
    popularity  distinct | uniform | identical | zipf:<alpha> | skewed:<hot share>
    lengths     fixed:<n> | uniform:<lo>:<hi> | lognormal:<median>:<sigma>[:<max>]

Nothing here imports torch or talks to a server.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# Short, frequent English words: each is one token (with its leading space) in the BPE
# vocabularies of Llama, Qwen2 and SmolLM2, so a prompt of n words is close to n tokens.
_PROSE = ("the of and to in is was for on are with as his they be at one have this from or had "
         "by word but what some we can out other were all there when up use your how said an "
         "each she which do their time if will way about many then them write would like so "
         "these her long make thing see him two has look more day could go come did number "
         "sound no most people my over know water than call first who may down side been now "
         "find any new work part take get place made live where after back little only round "
         "man year came show every good me give our under name very through just form sentence "
         "great think say help low line differ turn cause much mean before move right boy old "
         "too same tell does set three want air well also play small end put home read hand "
         "port large spell add even land here must big high such follow act why ask men change "
         "went light kind off need house picture try us again animal point mother world near "
         "build self earth father head stand own page should country found answer school grow "
         "study still learn plant cover food sun four between state keep eye never last let "
         "thought city tree cross farm hard start might story saw far sea draw left late run "
         "while press close night real life few north open seem together next white children "
         "begin got walk example ease paper group always music those both mark often letter "
         "until mile river car feet care second book carry took science eat room friend began "
         "idea fish mountain stop once base hear horse cut sure watch color face wood main "
         "enough plain girl usual young ready above ever red list though feel talk bird soon "
         "body dog family direct pose leave song measure door product black short class "
         "wind question happen complete ship area half rock order fire south problem piece told "
         "knew pass since top whole king space heard best hour better true during hundred five "
         "remember step early hold west ground interest reach fast verb sing listen six table "
         "travel less morning ten simple several vowel toward war lay against pattern slow "
         "center love person money serve appear road map rain rule govern pull cold notice "
         "voice unit power town fine certain fly fall lead cry dark machine note wait plan "
         "figure star box noun field rest correct able pound done beauty drive stood contain "
         "front teach week final gave green oh quick develop ocean warm free minute strong "
         "special mind behind clear tail produce fact street inch multiply nothing course stay "
         "wheel full force blue object decide surface deep moon island foot system busy test "
         "record boat common gold possible plane stead dry wonder laugh thousand ago ran check "
         "game shape equate hot miss brought heat snow tire bring yes distant fill east paint "
         "language among")
WORDS = tuple(_PROSE.split())


class Arrivals(Protocol):
    def times(self, rng: random.Random, count: int) -> list[float] | None:
        """Send times in seconds from the start, or None for a closed loop."""


@dataclass(frozen=True)
class GammaArrivals:
    """Open loop at `rate` requests/s. Gaps are gamma with shape `burstiness` and mean
    1/rate (vLLM's knob): 1 is Poisson, below 1 burstier, above 1 more regular. An infinite
    rate sends everything at once."""

    rate: float
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        assert self.rate > 0 and self.burstiness > 0, "rate and burstiness must be positive"

    def times(self, rng: random.Random, count: int) -> list[float]:
        if math.isinf(self.rate):
            return [0.0] * count
        t, out = 0.0, []
        for _ in range(count):
            out.append(t)
            t += rng.gammavariate(self.burstiness, 1.0 / (self.rate * self.burstiness))
        return out


@dataclass(frozen=True)
class ClosedLoop:
    """`concurrency` clients, each sending its next request when the last one finishes."""

    concurrency: int

    def __post_init__(self) -> None:
        assert self.concurrency >= 1, "concurrency must be at least 1"

    def times(self, rng: random.Random, count: int) -> None:
        return None


class Popularity(Protocol):
    def pick(self, rng: random.Random, count: int, k: int) -> list[int]:
        """An adapter index in [0, k) for each of `count` requests."""


@dataclass(frozen=True)
class Distinct:
    """Request i asks for adapter i (mod k): as many different adapters as possible."""

    def pick(self, rng: random.Random, count: int, k: int) -> list[int]:
        return [i % k for i in range(count)]


@dataclass(frozen=True)
class Identical:
    """Every request asks for the same adapter."""

    def pick(self, rng: random.Random, count: int, k: int) -> list[int]:
        return [0] * count


@dataclass(frozen=True)
class Weighted:
    """Independent draws with fixed weights over the k adapters."""

    def weights(self, k: int) -> list[float]:
        return [1.0] * k

    def pick(self, rng: random.Random, count: int, k: int) -> list[int]:
        return rng.choices(range(k), weights=self.weights(k), k=count)


@dataclass(frozen=True)
class Uniform(Weighted):
    pass


@dataclass(frozen=True)
class Zipf(Weighted):
    """P(adapter i) proportional to 1 / (i + 1)^alpha."""

    alpha: float = 1.0

    def weights(self, k: int) -> list[float]:
        return [1.0 / (i + 1) ** self.alpha for i in range(k)]


@dataclass(frozen=True)
class Skewed(Weighted):
    """Adapter 0 takes `hot` of the traffic, the rest share the remainder evenly."""

    hot: float = 0.5

    def __post_init__(self) -> None:
        assert 0 < self.hot <= 1, "the hot share is a fraction in (0, 1]"

    def weights(self, k: int) -> list[float]:
        if k == 1:
            return [1.0]
        return [self.hot] + [(1 - self.hot) / (k - 1)] * (k - 1)


class Lengths(Protocol):
    def sample(self, rng: random.Random) -> int: ...


@dataclass(frozen=True)
class Fixed:
    n: int

    def sample(self, rng: random.Random) -> int:
        return self.n


@dataclass(frozen=True)
class UniformLengths:
    low: int
    high: int

    def __post_init__(self) -> None:
        assert 1 <= self.low <= self.high, "uniform lengths need 1 <= low <= high"

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(frozen=True)
class LogNormal:
    """Heavy-tailed like real prompts and answers: median `median`, log-space spread
    `sigma`, clipped to [1, cap]."""

    median: float
    sigma: float
    cap: int = 4096

    def sample(self, rng: random.Random) -> int:
        return max(1, min(self.cap, round(rng.lognormvariate(math.log(self.median), self.sigma))))


def parse_arrivals(form: str, rate: float, concurrency: int | None) -> Arrivals:
    name, *args = form.split(":")
    if name == "closed":
        return ClosedLoop(concurrency or 1)
    if name == "poisson" and not args:
        return GammaArrivals(rate)
    if name == "gamma" and len(args) == 1:
        return GammaArrivals(rate, float(args[0]))
    raise ValueError(f"arrivals {form!r}: expected poisson, gamma:<burstiness> or closed")


def parse_popularity(form: str) -> Popularity:
    name, *args = form.split(":")
    simple = {"distinct": Distinct, "identical": Identical, "uniform": Uniform}
    if name in simple and not args:
        return simple[name]()
    if name == "zipf" and len(args) <= 1:
        return Zipf(float(args[0]) if args else 1.0)
    if name == "skewed" and len(args) <= 1:
        return Skewed(float(args[0]) if args else 0.5)
    raise ValueError(f"popularity {form!r}: expected distinct, uniform, identical, "
                     "zipf[:alpha] or skewed[:hot share]")


def parse_lengths(form: str) -> Lengths:
    name, *args = form.split(":")
    try:
        if name == "fixed" and len(args) == 1:
            return Fixed(int(args[0]))
        if name == "uniform" and len(args) == 2:
            return UniformLengths(int(args[0]), int(args[1]))
        if name == "lognormal" and len(args) in (2, 3):
            return LogNormal(float(args[0]), float(args[1]), *(int(a) for a in args[2:]))
    except ValueError:
        pass
    raise ValueError(f"lengths {form!r}: expected fixed:N, uniform:LO:HI or "
                     "lognormal:MEDIAN:SIGMA[:MAX]")


@dataclass(frozen=True)
class Item:
    """One request of a workload."""

    index: int
    send_at: float | None  # seconds from the start; None in a closed loop
    adapter: str | None  # None: the base model
    prompt: str
    max_tokens: int


@dataclass(frozen=True)
class WorkloadSpec:
    adapters: tuple[str, ...]  # empty: every request goes to the base model
    num_requests: int
    arrivals: Arrivals
    popularity: Popularity = field(default_factory=Uniform)
    prompt_len: Lengths = Fixed(64)
    output_len: Lengths = Fixed(64)
    prompts_file: str | None = None  # JSONL of {"prompt": str, "max_tokens"?: int}
    duration_s: float | None = None  # open loop: no request is sent after this
    seed: int = 0

    def __post_init__(self) -> None:
        assert self.num_requests >= 1, "a workload has at least one request"

    def items(self) -> list[Item]:
        """The requests, identical for an identical spec."""
        rng = random.Random(self.seed)
        # Each aspect draws from its own stream, so changing the popularity leaves the
        # arrival times and lengths as they were.
        streams = [random.Random(rng.getrandbits(64)) for _ in range(4)]
        times = self.arrivals.times(streams[0], self.num_requests)
        picks = (self.popularity.pick(streams[1], self.num_requests, len(self.adapters))
                 if self.adapters else [None] * self.num_requests)
        prompts = self._prompts(streams[2], streams[3])
        items = []
        for i in range(self.num_requests):
            send_at = None if times is None else times[i]
            if send_at is not None and self.duration_s is not None and send_at > self.duration_s:
                break
            prompt, max_tokens = prompts[i]
            adapter = None if picks[i] is None else self.adapters[picks[i]]
            items.append(Item(i, send_at, adapter, prompt, max_tokens))
        return items

    def _prompts(self, rng: random.Random, out_rng: random.Random) -> list[tuple[str, int]]:
        if self.prompts_file is None:
            return [(" ".join(rng.choices(WORDS, k=self.prompt_len.sample(rng))),
                     self.output_len.sample(out_rng)) for _ in range(self.num_requests)]
        rows = load_prompts(self.prompts_file)
        order = rng.sample(range(len(rows)), len(rows))
        return [(rows[order[i % len(rows)]]["prompt"],
                 rows[order[i % len(rows)]].get("max_tokens") or self.output_len.sample(out_rng))
                for i in range(self.num_requests)]


def load_prompts(path: str | Path) -> list[dict]:
    """JSONL, one `{"prompt": "...", "max_tokens": n}` per line (max_tokens optional)."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ValueError(f"{path}:{n}: expected an object with a non-empty 'prompt' string")
        if "max_tokens" in row and not (isinstance(row["max_tokens"], int) and row["max_tokens"] > 0):
            raise ValueError(f"{path}:{n}: 'max_tokens' must be a positive integer")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows
