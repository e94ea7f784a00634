"""Which route serves a model name, and the bounded label the metrics use for it."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from .config import Route, Settings


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    #: the metric label: the model name when the route lists it exactly, else the pattern
    label: str


class Router:
    """First matching route wins; patterns are shell-style (`sim-*`), case-sensitive."""

    def __init__(self, settings: Settings) -> None:
        self._routes = settings.routes
        #: every (route, pattern, whether the pattern is a plain name), in order: a request
        #: does not look at a pattern's characters again
        self._patterns = [
            (route, pattern, _literal(pattern))
            for route in self._routes
            for pattern in route.models
        ]

    def match(self, model: str) -> RouteMatch | None:
        for route, pattern, literal in self._patterns:
            if pattern == model:
                return RouteMatch(route, model)
            if not literal and fnmatchcase(model, pattern):
                return RouteMatch(route, pattern)
        return None

    def listed_models(self) -> list[str]:
        """The model ids `GET /v1/models` shows: every exact name and every pattern, in order."""
        seen: dict[str, None] = {}
        for route in self._routes:
            for pattern in route.models:
                seen.setdefault(pattern, None)
        return list(seen)


def _literal(pattern: str) -> bool:
    return not any(ch in pattern for ch in "*?[")
