"""Which route serves a model name, and the bounded label the metrics use for it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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

    def pattern_upstreams(self) -> list[str]:
        """The upstreams of the routes that name a pattern: whose model lists `listed_models`
        needs, in route order, each once."""
        names: dict[str, None] = {}
        for route, _, literal in self._patterns:
            if not literal:
                names.update(dict.fromkeys(route.upstream_names))
        return list(names)

    def listed_models(self, upstream_models: Callable[[str], Iterable[str]]) -> list[str]:
        """The model ids `GET /v1/models` shows, in route order, each once: every exact name,
        and for a pattern the models its route's upstreams list (`upstream_models(name)`)
        that match it and that this route would serve (an earlier route does not claim them).
        A pattern itself is never listed."""
        seen: dict[str, None] = {}
        for route, pattern, literal in self._patterns:
            if literal:
                seen.setdefault(pattern, None)
                continue
            for upstream in route.upstream_names:
                for model in upstream_models(upstream):
                    found = self.match(model)
                    if found is not None and found.route is route and found.label == pattern:
                        seen.setdefault(model, None)
        return list(seen)


def _literal(pattern: str) -> bool:
    return not any(ch in pattern for ch in "*?[")
