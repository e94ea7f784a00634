"""Prices: what a request's tokens cost, from the `pricing` table (USD per million tokens).

The first entry whose `models` names or matches (fnmatch) the requested model wins. A model
with no entry costs nothing; its tokens are counted in `gateway_unpriced_tokens_total` so an
operator notices. Reasoning tokens are part of the completion and cost the output price;
cached prompt tokens cost `cached_input`, the rest of the prompt `input`.

Looked up once per request (and kept per requested name, a bounded few), never per event.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from .config import Price, Settings

PER_MILLION = 1_000_000.0
#: requested names whose rates are kept; past that, lookups are computed (still per request)
KEPT_NAMES = 1024


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per token."""

    input: float
    cached_input: float
    output: float

    @classmethod
    def of(cls, price: Price) -> Rates:
        cached = price.input if price.cached_input is None else price.cached_input
        return cls(price.input / PER_MILLION, cached / PER_MILLION, price.output / PER_MILLION)

    def prompt_cost(self, prompt_tokens: int, cached_tokens: int = 0) -> float:
        cached = min(cached_tokens, prompt_tokens)
        return (prompt_tokens - cached) * self.input + cached * self.cached_input

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        return self.prompt_cost(prompt_tokens, cached_tokens) + completion_tokens * self.output


class Pricing:
    """The pricing table of one configuration (a reload builds a new one)."""

    def __init__(self, settings: Settings) -> None:
        self._entries = [(price.models, Rates.of(price)) for price in settings.pricing]
        self._kept: dict[str, Rates | None] = {}

    def rates_for(self, model: str) -> Rates | None:
        """The rates of the requested model name; None when no entry prices it."""
        try:
            return self._kept[model]
        except KeyError:
            pass
        found = next((rates for models, rates in self._entries if _matches(models, model)), None)
        if len(self._kept) < KEPT_NAMES:
            self._kept[model] = found
        return found


def _matches(patterns: tuple[str, ...], model: str) -> bool:
    return any(model == pattern or fnmatchcase(model, pattern) for pattern in patterns)
