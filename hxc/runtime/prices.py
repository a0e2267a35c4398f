"""What a device costs per hour, for the `cost` policy.

Prices come from a small TOML file — `$HXC_PRICES` if set, else `prices.toml` in the
user's config directory (`$XDG_CONFIG_HOME/hxc`, default `~/.config/hxc`) — laid over
documented defaults:

    currency = "USD"
    cpu_core_hour = 0.045          # one CPU core (vCPU) for an hour

    [devices]                      # price per device-hour; keys are case-insensitive
    "*H100*" = 2.99                # globs on the device label, "driver: name"
    "vulkan: llvmpipe*" = 0.0      # e.g. treat the software Vulkan device as free

A device matches the first of the file's patterns, then the defaults' (a few common
GPUs by name); a CPU-type device that matches nothing — the host CPU on local-task,
and a software Vulkan device such as lavapipe, which computes on the same cores — costs
the cores it uses times `cpu_core_hour`. Anything else has no price, and the cost
policy says so instead of guessing.
"""

from __future__ import annotations

import fnmatch
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from hxc.errors import UsageError, first_line
from hxc.targets import Device

PRICES_ENV = "HXC_PRICES"
DEFAULT_CURRENCY = "USD"
# AWS c7i on-demand: $0.0893/h for 2 vCPUs.
DEFAULT_CPU_CORE_HOUR = 0.045
# On-demand cloud prices per GPU-hour, rounded; illustrative, not quotes. Set your own.
DEFAULT_DEVICE_PRICES: tuple[tuple[str, float], ...] = (
    ("*H200*", 3.79),
    ("*H100*", 2.99),
    ("*A100*", 1.79),
    ("*L40S*", 1.25),
    ("*A10G*", 1.01),
    ("*L4*", 0.71),
    ("*T4*", 0.35),
    ("*RTX 4090*", 0.69),
    ("*MI300X*", 2.49),
    ("*MI250*", 1.49),
)


@dataclass(frozen=True)
class Price:
    per_hour: float
    source: str  # how it was found, for explain(): a pattern and its file, or the core arithmetic


@dataclass(frozen=True)
class PriceTable:
    currency: str = DEFAULT_CURRENCY
    cpu_core_hour: float = DEFAULT_CPU_CORE_HOUR
    patterns: tuple[tuple[str, float, str], ...] = ()  # (glob, per hour, where it came from), first match wins
    path: Path | None = None  # the file read, if any

    def price(self, device: Device, cores: int) -> Price | None:
        """The hourly price of `device` when it uses `cores` CPU cores (CPU-type devices)."""
        label = device.label.lower()
        for glob, per_hour, origin in self.patterns:
            if fnmatch.fnmatchcase(label, glob.lower()):
                return Price(per_hour, f"{glob!r} in {origin}")
        if device.kind == "cpu":
            return Price(cores * self.cpu_core_hour, f"{cores} cores x {self.cpu_core_hour:g}/core-hour")
        return None


def default_prices() -> PriceTable:
    return PriceTable(patterns=tuple((g, p, "defaults") for g, p in DEFAULT_DEVICE_PRICES))


def prices_path() -> Path | None:
    """The price file in effect: $HXC_PRICES, else the user's config file if it exists."""
    if env := os.environ.get(PRICES_ENV):
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = base / "hxc" / "prices.toml"
    return path if path.is_file() else None


def load_prices(path: str | os.PathLike[str] | None = None) -> PriceTable:
    """The defaults, overlaid with `path` (else $HXC_PRICES, else the user's config file).
    A file that is missing, malformed or holds a negative price is a one-line UsageError."""
    file = Path(path) if path is not None else prices_path()
    table = default_prices()
    if file is None:
        return table
    try:
        data = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise UsageError(f"{file}: no such price file", hint=f"unset {PRICES_ENV} or create it") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{file}: not a valid prices TOML file ({first_line(e)})") from None
    unknown = set(data) - {"currency", "cpu_core_hour", "devices"}
    if unknown:
        raise UsageError(f"{file}: unknown key(s) {', '.join(sorted(unknown))}",
                         hint="expected currency, cpu_core_hour and a [devices] table")  # fmt: skip
    currency = data.get("currency", DEFAULT_CURRENCY)
    if not isinstance(currency, str):
        raise UsageError(f"{file}: currency must be a string")
    devices = data.get("devices", {})
    if not isinstance(devices, dict):
        raise UsageError(f"{file}: [devices] must be a table of \"pattern\" = price per hour")
    mine = tuple((str(glob), _price(file, f"devices.{glob!r}", p), str(file)) for glob, p in devices.items())
    core = _price(file, "cpu_core_hour", data.get("cpu_core_hour", DEFAULT_CPU_CORE_HOUR))
    return PriceTable(currency, core, mine + table.patterns, file)


def _price(file: Path, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{file}: {key} must be a price per hour >= 0, not {value!r}")
    return float(value)


def cost_per_1k(price: Price, items_per_second: float) -> float | None:
    """Cost of 1,000 items (rows of a batch) at this price and measured throughput."""
    if items_per_second <= 0:
        return None
    return price.per_hour / (items_per_second * 3600) * 1000
