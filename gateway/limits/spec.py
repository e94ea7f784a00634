"""What a team may do per minute: the value the app builds from ``teams[].limits``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """Limits for one bucket key; ``None`` means that dimension is not limited.

    A spec with every field ``None`` admits everything without touching any backend.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None
    #: True when no dimension is limited, so admission needs no bookkeeping at all (worked
    #: out once here rather than on every admission)
    unlimited: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "concurrent_streams"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 or absent, got {value}")
        unlimited = (
            self.requests_per_minute is None
            and self.tokens_per_minute is None
            and self.concurrent_streams is None
        )
        object.__setattr__(self, "unlimited", unlimited)
