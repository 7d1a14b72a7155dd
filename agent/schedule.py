"""Bandwidth by time of day: rules that change the caps at their boundaries. Pure.

A rule is a window of the day (local time; one that ends before it starts runs past
midnight) and the caps in force inside it; outside every window the settings' own caps
apply. The first rule whose window holds the moment wins. Three caps can be scheduled:

- ``download_rate``: everything this machine downloads (the LAN and the outside link);
- ``outside_download_rate``: what it downloads from outside the room (the OSS mirror and
  the origins), so a class's LAN stays fast while the school's link is spared;
- ``upload_rate``: what it sends to LAN peers.

In the config file::

    [[limits.schedule]]
    hours = "07:00-18:00"            # class hours: spare the school's link
    outside_download_rate = "5MB"
    [[limits.schedule]]
    hours = "18:00-07:00"            # night: full speed
    outside_download_rate = "unlimited"

or ``SHOAL_RATE_SCHEDULE="07:00-18:00 outside_download_rate=5MB; 18:00-07:00
outside_download_rate=unlimited"``. A cap a rule leaves out is the settings' own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.errors import ConfigError
from agent.units import parse_size

CAPS = ("download_rate", "outside_download_rate", "upload_rate")
MAX_RULES = 24
_HOURS = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


@dataclass(frozen=True)
class Rule:
    hours: str  # "HH:MM-HH:MM", as written
    start: int  # minutes since midnight
    end: int
    caps: tuple[tuple[str, int | None], ...]  # (cap, bytes per second or None: unlimited)

    def holds(self, minute: int) -> bool:
        if self.start == self.end:
            return True  # the whole day
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


def parse(text: str) -> tuple[Rule, ...]:
    """Rules from the kept form (``"HOURS CAP=SIZE ...; ..."``); ``ConfigError`` naming what is wrong."""
    rules = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        words = part.split()
        match = _HOURS.fullmatch(words[0])
        if not match:
            raise ConfigError(f"rate schedule: {words[0]!r} is not hours HH:MM-HH:MM (in {part!r})")
        caps = []
        for word in words[1:]:
            name, eq, value = word.partition("=")
            if not eq or name not in CAPS:
                raise ConfigError(f"rate schedule: {word!r} is not CAP=SIZE with CAP one of {', '.join(CAPS)}")
            try:
                caps.append((name, parse_size(value)))
            except ValueError:
                raise ConfigError(f"rate schedule: {value!r} is not a size such as 5MB or unlimited") from None
        if not caps:
            raise ConfigError(f"rate schedule: the rule {part!r} sets no cap")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        rules.append(Rule(words[0], h1 * 60 + m1, h2 * 60 + m2, tuple(caps)))
    if len(rules) > MAX_RULES:
        raise ConfigError(f"rate schedule: at most {MAX_RULES} rules")
    return tuple(rules)


def from_toml(rules: list) -> str:
    """``[[limits.schedule]]`` tables in the kept form."""
    if not isinstance(rules, list):
        raise ValueError(rules)
    parts = []
    for rule in rules:
        if not isinstance(rule, dict) or not isinstance(rule.get("hours"), str):
            raise ValueError(rule)
        parts.append(" ".join([rule["hours"]] + [f"{k}={v}" for k, v in rule.items() if k != "hours"]))
    return "; ".join(parts)


def in_force(rules: tuple[Rule, ...], minute: int) -> Rule | None:
    return next((r for r in rules if r.holds(minute)), None)


def caps_at(rules: tuple[Rule, ...], base: dict[str, int | None], minute: int) -> tuple[dict, str | None]:
    """The caps in force at ``minute`` of the day: the rule's over ``base``, and the rule's hours."""
    rule = in_force(rules, minute)
    caps = dict(base)
    if rule is not None:
        caps.update(dict(rule.caps))
    return caps, rule.hours if rule else None


def minutes_to_next_change(rules: tuple[Rule, ...], minute: int) -> int:
    """Minutes until some rule starts or ends (1440 with no rules)."""
    bounds = {b for r in rules for b in (r.start, r.end)}
    if not bounds:
        return 1440
    return min((b - minute) % 1440 or 1440 for b in bounds)


def minute_of_day(now: float) -> int:
    import time
    local = time.localtime(now)
    return local.tm_hour * 60 + local.tm_min


async def follow(rules: tuple[Rule, ...], base, apply, clock) -> None:
    """Keep the caps in force: ``apply(caps, hours)`` now and at every boundary. ``base()``
    gives the settings' caps (``shoal config set`` changes them); ``clock()`` the time
    (the wall clock; a test's virtual one). Wakes at least every minute."""
    import trio
    while True:
        now = clock()
        apply(*caps_at(rules, base(), minute_of_day(now)))
        into_minute = now % 60
        await trio.sleep(min(60.0, minutes_to_next_change(rules, minute_of_day(now)) * 60 - into_minute) or 60.0)
