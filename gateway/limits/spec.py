"""What a team may do per minute: the value the app builds from ``teams[].limits``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """Limits for one bucket key; ``None`` means that dimension is not limited.

    A spec with every field ``None`` admits everything without touching any backend.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "concurrent_streams"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 or absent, got {value}")

    @property
    def unlimited(self) -> bool:
        """True when no dimension is limited, so admission needs no bookkeeping at all."""
        return (
            self.requests_per_minute is None
            and self.tokens_per_minute is None
            and self.concurrent_streams is None
        )
