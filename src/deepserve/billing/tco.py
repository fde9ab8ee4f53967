"""Total cost of ownership: cloud replicas against owned hardware, for the traffic in a
ledger (``deepserve report --ledger L --tco tco.toml``).

    [capacity]
    output_tokens_per_s = 2500     # what one replica / one server sustains
    [cloud]
    hourly_price = 4.10            # per replica-hour
    min_replicas = 0               # always running (0: scale to zero between bursts)
    target_utilization = 0.7       # autoscaling keeps replicas this busy
    [on_prem]
    servers = 2
    purchase_price = 150000        # per server
    years = 4                      # written off over
    power_kw = 6.5                 # per server at full load
    idle_power_fraction = 0.3      # share of full power drawn when idle
    kwh_price = 0.15
    operations_per_year = 30000    # staff, space, support, for all servers
    [report]
    volumes = [100000, 500000]     # requests/day to compare at (the ledger's is added)

The ledger gives the traffic: requests per day over its period and the mean output
tokens per request, so a day's volume V needs V x tokens / capacity replica-seconds.

- Cloud, per day: replica-hours = max(24 x min_replicas, ceil(24 x needed /
  target_utilization)) at ``hourly_price``: autoscaled by the hour to the volume.
- On premises, per day: the purchase written off over ``years``, operations, and
  power = servers x power_kw x 24 h x kwh_price x (idle + (1 - idle) x utilization),
  utilization = needed / servers (measured from the ledger's traffic). A volume past
  the servers' capacity buys more servers.
- Break-even: the smallest daily volume at which owning costs no more than renting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepserve.config import read_toml
from deepserve.errors import DeepserveError

DAY_S = 86400.0


@dataclass(frozen=True)
class TCOInputs:
    output_tokens_per_s: float
    hourly_price: float
    min_replicas: int = 0
    target_utilization: float = 0.7
    servers: int = 1
    purchase_price: float = 0.0
    years: float = 4.0
    power_kw: float = 1.0
    idle_power_fraction: float = 0.3
    kwh_price: float = 0.15
    operations_per_year: float = 0.0
    volumes: tuple[int, ...] = ()
    currency: str = "USD"
    source: str = "tco"

    @classmethod
    def load(cls, path: str | Path) -> TCOInputs:
        return cls.from_dict(read_toml(path, "TCO file", "tco"), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str) -> TCOInputs:
        """From a TCO file's sections (the file, or the admin API's request body)."""
        cap, cloud = data.get("capacity", {}), data.get("cloud", {})
        prem, rep = data.get("on_prem", {}), data.get("report", {})
        for section, key in (("capacity", "output_tokens_per_s"), ("cloud", "hourly_price"),
                             ("on_prem", "purchase_price"), ("on_prem", "servers")):
            if key not in data.get(section, {}):
                raise DeepserveError(f"TCO file {path}: [{section}] needs {key}", param="tco")
        try:
            inputs = cls(float(cap["output_tokens_per_s"]), float(cloud["hourly_price"]),
                         int(cloud.get("min_replicas", 0)),
                         float(cloud.get("target_utilization", 0.7)), int(prem["servers"]),
                         float(prem["purchase_price"]), float(prem.get("years", 4)),
                         float(prem.get("power_kw", 1.0)),
                         float(prem.get("idle_power_fraction", 0.3)),
                         float(prem.get("kwh_price", 0.15)),
                         float(prem.get("operations_per_year", 0.0)),
                         tuple(int(v) for v in rep.get("volumes", [])),
                         str(data.get("currency", "USD")), str(path))
        except (TypeError, ValueError) as exc:
            raise DeepserveError(f"TCO file {path}: {exc}", param="tco") from None
        if inputs.output_tokens_per_s <= 0 or inputs.years <= 0 or inputs.servers < 1 or \
                not 0 < inputs.target_utilization <= 1 or \
                not 0 <= inputs.idle_power_fraction <= 1:
            raise DeepserveError(f"TCO file {path}: output_tokens_per_s and years must be "
                                 "> 0, servers >= 1, target_utilization in (0, 1], "
                                 "idle_power_fraction in [0, 1]", param="tco")
        return inputs


@dataclass
class DayCost:
    volume: int
    cloud: float
    cloud_replica_hours: int
    on_prem: float
    servers: int
    utilization: float
    parts: dict[str, float] = field(default_factory=dict)


def day_cost(t: TCOInputs, volume: float, tokens_per_request: float) -> DayCost:
    """Cloud and on-premises cost of one day at ``volume`` requests."""
    needed = volume * tokens_per_request / (t.output_tokens_per_s * DAY_S)  # busy units
    hours = max(24 * t.min_replicas, math.ceil(24 * needed / t.target_utilization - 1e-9))
    cloud = hours * t.hourly_price
    servers = max(t.servers, math.ceil(needed - 1e-9))
    util = min(1.0, needed / servers)
    capex = servers * t.purchase_price / (t.years * 365)
    ops = t.operations_per_year / 365 * servers / t.servers
    power = servers * t.power_kw * 24 * t.kwh_price * (
        t.idle_power_fraction + (1 - t.idle_power_fraction) * util)
    return DayCost(int(volume), cloud, hours, capex + ops + power, servers, util,
                   {"capex": capex, "operations": ops, "power": power})


def break_even(t: TCOInputs, tokens_per_request: float, top: int = 10**9) -> int | None:
    """Smallest daily volume (requests) at which owning costs no more than the cloud."""
    v = 1
    while v <= top:
        if day_cost(t, v, tokens_per_request).on_prem <= day_cost(t, v, tokens_per_request).cloud:
            lo, hi = v // 2, v
            while hi - lo > 1:
                mid = (lo + hi) // 2
                c = day_cost(t, mid, tokens_per_request)
                lo, hi = (lo, mid) if c.on_prem <= c.cloud else (mid, hi)
            return hi
        v *= 2
    return None


def traffic(report: dict[str, Any]) -> tuple[float, float, float]:
    """(requests per day, mean output tokens per request, days) from a cost report."""
    t = report["total"]
    days = max(report.get("period_seconds", 0.0), 1.0) / DAY_S
    reqs = t["requests"]
    return reqs / days, (t["output_tokens"] / reqs if reqs else 0.0), days


def build_tco(report: dict[str, Any], t: TCOInputs) -> dict[str, Any]:
    per_day, tokens, days = traffic(report)
    if tokens <= 0:
        raise DeepserveError("the ledger has no output tokens in this period: the TCO "
                             "needs traffic to size replicas", param="tco")
    volumes = sorted({*t.volumes, round(per_day)})
    return {"inputs": vars(t), "ledger": {"requests_per_day": per_day,
                                          "output_tokens_per_request": tokens,
                                          "days": days},
            "at": [vars(day_cost(t, v, tokens)) for v in volumes],
            "break_even_requests_per_day": break_even(t, tokens)}


def to_markdown(tco: dict[str, Any]) -> str:
    i, led = tco["inputs"], tco["ledger"]
    c = i["currency"]
    be = tco["break_even_requests_per_day"]
    lines = [
        "# Total cost of ownership: cloud against owned servers", "",
        f"Traffic from the ledger: {led['requests_per_day']:,.0f} requests/day over "
        f"{led['days']:.2f} days, {led['output_tokens_per_request']:.1f} output tokens per "
        f"request. Capacity {i['output_tokens_per_s']:g} output tokens/s per replica or "
        "server.", "",
        f"Cloud: {i['hourly_price']:g} {c} per replica-hour, at least "
        f"{i['min_replicas']} replica(s) always on, autoscaled by the hour to "
        f"{i['target_utilization']:.0%} busy.",
        f"On premises: {i['servers']} server(s) at {i['purchase_price']:,.0f} {c} over "
        f"{i['years']:g} years, {i['power_kw']:g} kW each at {i['kwh_price']:g} {c}/kWh "
        f"({i['idle_power_fraction']:.0%} of it when idle), operations "
        f"{i['operations_per_year']:,.0f} {c}/year.", "",
        "| requests/day | cloud replica-hours | cloud/day | servers | utilization | "
        "capex/day | operations/day | power/day | on-prem/day | cheaper |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for a in tco["at"]:
        p = a["parts"]
        lines.append(
            f"| {a['volume']:,} | {a['cloud_replica_hours']} | {a['cloud']:,.2f} | {a['servers']} "
            f"| {a['utilization']:.1%} | {p['capex']:,.2f} | {p['operations']:,.2f} | "
            f"{p['power']:,.2f} | {a['on_prem']:,.2f} | "
            f"{'on-prem' if a['on_prem'] <= a['cloud'] else 'cloud'} |")
    lines += ["", f"Break-even: {be:,} requests/day" if be else
              "Break-even: owning never costs less than the cloud in this range"]
    return "\n".join(lines)


def plot(tco: dict[str, Any], t: TCOInputs, path: str | Path) -> None:
    """Cost per day against daily volume, both options, the ledger's volume marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = tco["ledger"]["output_tokens_per_request"]
    top = max([*t.volumes, tco["ledger"]["requests_per_day"],
               tco["break_even_requests_per_day"] or 0]) * 1.5 or 1000
    xs = [top * k / 200 for k in range(1, 201)]
    costs = [day_cost(t, x, tokens) for x in xs]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, [c.cloud for c in costs], label="cloud (autoscaled replicas)")
    ax.plot(xs, [c.on_prem for c in costs], label="on premises (owned servers)")
    ax.axvline(tco["ledger"]["requests_per_day"], color="k", ls=":", label="ledger's volume")
    if tco["break_even_requests_per_day"]:
        ax.axvline(tco["break_even_requests_per_day"], color="r", ls="--",
                   label="break-even")
    ax.set_xlabel("requests per day")
    ax.set_ylabel(f"cost per day ({t.currency})")
    ax.set_title("Total cost of ownership")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
