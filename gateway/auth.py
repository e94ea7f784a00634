"""Gateway keys to teams.

Keys are held only as SHA-256 digests (plaintext keys from the configuration are hashed at
start-up). A presented key is hashed and compared against every digest with
`hmac.compare_digest`, without stopping at the first match, so timing tells nothing about which
key or team is near.
"""

from __future__ import annotations

import hashlib
import hmac

from .config import Settings, Team, TeamKey, team_key_entries
from .errors import Unauthorized

#: who presented a key: its team, and the key's named entry (None for a plain string key)
Identity = tuple[Team, TeamKey | None]


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        self._digests: list[tuple[bytes, Identity]] = [
            (bytes.fromhex(digest), (team, entry))
            for team in settings.teams
            for digest, entry in team_key_entries(team)
        ]

    def team_for(self, authorization: str | None) -> Team | None:
        """The team a request belongs to; None when auth is off. Raises Unauthorized."""
        found = self.identify(authorization)
        return None if found is None else found[0]

    def identify(self, authorization: str | None) -> Identity | None:
        """The team and named key a request belongs to; None when auth is off. Raises
        Unauthorized."""
        if not self.enabled:
            return None
        key = _bearer(authorization)
        presented = hashlib.sha256(key.encode()).digest()
        found: Identity | None = None
        for digest, identity in self._digests:
            if hmac.compare_digest(digest, presented):
                found = identity
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
