"""Pricing policy: per-model prices per million tokens, time-of-day windows and
utilization multipliers, loaded from a TOML file (``--pricing FILE``).

    currency = "USD"

    [models.default]            # any model not listed by name
    cache_hit_input = 0.14      # per million prompt tokens served from the prefix cache
    cache_miss_input = 0.55     # per million prompt tokens computed
    output = 2.19               # per million generated tokens

    [[windows]]                 # UTC; may wrap past midnight
    name = "off-peak"
    start = "16:30"
    end = "00:30"
    multiplier = 0.5

    [[utilization]]             # first matching rule applies
    below = 0.5
    multiplier = 0.7
    [[utilization]]
    above = 0.8
    multiplier = 1.2

Prices are fixed when a request starts and recorded with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

from deepserve.config import read_toml
from deepserve.errors import DeepserveError

# DeepSeek-R1's published list prices, USD per million tokens.
DEFAULT_PRICES = {"cache_hit_input": 0.14, "cache_miss_input": 0.55, "output": 2.19}


@dataclass(frozen=True)
class ModelPrices:
    """USD (or the policy's currency) per million tokens of each class."""

    cache_hit_input: float
    cache_miss_input: float
    output: float


@dataclass(frozen=True)
class Window:
    """A daily UTC time window with a price multiplier (e.g. off-peak discount)."""

    name: str
    start: time
    end: time
    multiplier: float

    def contains(self, t: time) -> bool:
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end  # wraps past midnight


@dataclass(frozen=True)
class UtilizationRule:
    """Multiplier when utilization is below or above a threshold (0-1)."""

    multiplier: float
    below: float | None = None
    above: float | None = None

    def matches(self, utilization: float) -> bool:
        if self.below is not None and not utilization < self.below:
            return False
        return self.above is None or utilization > self.above


@dataclass(frozen=True)
class Quote:
    """The prices a request is charged, fixed when it starts."""

    model: str
    list_prices: ModelPrices
    multiplier: float
    rules: tuple[str, ...]
    currency: str

    def list_cost(self, hit: int, miss: int, out: int) -> float:
        p = self.list_prices
        return (hit * p.cache_hit_input + miss * p.cache_miss_input + out * p.output) / 1e6

    def cost(self, hit: int, miss: int, out: int) -> float:
        return self.list_cost(hit, miss, out) * self.multiplier


@dataclass(frozen=True)
class PricingPolicy:
    """Prices per model plus the rules that scale them."""

    models: dict[str, ModelPrices] = field(
        default_factory=lambda: {"default": ModelPrices(**DEFAULT_PRICES)})
    currency: str = "USD"
    windows: tuple[Window, ...] = ()
    utilization: tuple[UtilizationRule, ...] = ()

    def prices(self, model: str) -> ModelPrices:
        return self.models.get(model) or self.models.get("default") or \
            ModelPrices(**DEFAULT_PRICES)

    def quote(self, model: str, when: datetime, utilization: float) -> Quote:
        """Prices for a request of ``model`` starting at ``when`` at this utilization."""
        t = when.astimezone(UTC).time()
        multiplier = 1.0
        rules: list[str] = []
        for w in self.windows:
            if w.contains(t):
                multiplier *= w.multiplier
                rules.append(w.name)
        for i, rule in enumerate(self.utilization):
            if rule.matches(utilization):
                multiplier *= rule.multiplier
                rules.append(f"utilization[{i}]")
                break
        return Quote(model, self.prices(model), multiplier, tuple(rules), self.currency)

    @classmethod
    def load(cls, path: str | Path) -> PricingPolicy:
        return cls.from_dict(read_toml(path, "pricing file", "pricing"), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "pricing") -> PricingPolicy:
        def bad(msg: str) -> DeepserveError:
            return DeepserveError(f"{source}: {msg}", param="pricing")

        models = {}
        for name, spec in (data.get("models") or {"default": DEFAULT_PRICES}).items():
            try:
                prices = ModelPrices(**{k: float(spec[k]) for k in DEFAULT_PRICES})
            except KeyError as exc:
                raise bad(f"models.{name} lacks {exc.args[0]} (needs cache_hit_input, "
                          "cache_miss_input, output, per million tokens)") from None
            if min(prices.cache_hit_input, prices.cache_miss_input, prices.output) < 0:
                raise bad(f"models.{name}: prices must be >= 0")
            models[name] = prices
        windows = []
        for i, w in enumerate(data.get("windows", [])):
            try:
                windows.append(Window(str(w.get("name", f"window{i}")),
                                      time.fromisoformat(w["start"]),
                                      time.fromisoformat(w["end"]),
                                      float(w["multiplier"])))
            except (KeyError, ValueError) as exc:
                raise bad(f"windows[{i}] needs start/end as HH:MM (UTC) and a multiplier "
                          f"({exc})") from None
        rules = []
        for i, u in enumerate(data.get("utilization", [])):
            if "multiplier" not in u or ("below" not in u and "above" not in u):
                raise bad(f"utilization[{i}] needs a multiplier and below or above (0-1)")
            rules.append(UtilizationRule(float(u["multiplier"]), u.get("below"),
                                         u.get("above")))
        return cls(models, str(data.get("currency", "USD")), tuple(windows), tuple(rules))
