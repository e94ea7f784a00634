"""Gateway keys to callers: the team, the named key, and whom their spend is charged to.

Keys are held only as SHA-256 digests (plaintext keys from the configuration are hashed at
start-up). A presented key is hashed and its digest looked up in a table built once per
configuration, so a request costs the same with one key or ten thousand. The lookup compares
digests, never keys: how long it takes can only tell about the digest of the key the caller
sent, which the caller knows already, and nothing about which stored key or team is near.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .config import Settings, Team, TeamKey, team_key_entries
from .errors import Unauthorized
from .spend import Subject, subjects_of


@dataclass(frozen=True, slots=True)
class Caller:
    """Who presented a key: its team, the key's named entry (None for a plain string key),
    and the subjects its spend is charged to (built here once, not per request)."""

    team: Team
    key: TeamKey | None
    subjects: tuple[Subject, ...]


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        self._callers: dict[bytes, Caller] = {}
        for team in settings.teams:
            for digest, entry in team_key_entries(team):  # unique: the config checks it
                self._callers[bytes.fromhex(digest)] = Caller(team, entry, subjects_of(team, entry))

    def identify(self, authorization: str | None) -> Caller | None:
        """The caller a request's key names; None when auth is off. Raises Unauthorized."""
        if not self.enabled:
            return None
        key = _bearer(authorization)
        found = self._callers.get(hashlib.sha256(key.encode()).digest())
        if found is None:
            raise Unauthorized("Incorrect API key provided.")
        return found


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
        )
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("The Authorization header must be 'Bearer <key>'.")
    return key.strip()
