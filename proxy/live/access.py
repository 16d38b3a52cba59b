"""Who is watching the live stream: open access, or a token that makes its holder admin or merchant."""

from __future__ import annotations

import dataclasses
import hmac
import typing

from proxy.policy import merchant_id_for

# Close of a session that failed to authenticate.
UNAUTHORIZED_CLOSE = (3401, "unauthorized")


@dataclasses.dataclass(frozen=True)
class Viewer:
    """Whose eyes a session is: everything (open mode, admin) or one merchant's view."""

    role: str  # "open" | "admin" | "merchant"
    merchant_id: str | None = None

    @property
    def sees_everything(self) -> bool:
        return self.merchant_id is None

    def auth_answer(self) -> dict[str, typing.Any]:
        answer: dict[str, typing.Any] = {"type": "auth", "role": self.role}
        if self.merchant_id is not None:
            answer["merchant_id"] = self.merchant_id
        return answer


EVERYTHING = Viewer("open")


class LiveAccess:
    """live.access and live.admin_tokens: who may see what on the live stream (and /status)."""

    def __init__(self, mode: str = "open", admin_tokens: typing.Iterable[str] = (), auth_timeout: float = 10.0):
        """auth_timeout: seconds a token-mode session may stay open without authenticating."""
        self.mode = mode
        self.auth_timeout = auth_timeout
        # Secrets: kept as bytes for constant-time comparison, never logged or shown.
        self._admin_tokens = [token.encode() for token in admin_tokens if token]

    @property
    def requires_token(self) -> bool:
        return self.mode == "token"

    def viewer_for(self, token: typing.Any) -> Viewer | None:
        """The viewer a token makes; None if it is no token at all (empty, not a string, too long)."""
        if not isinstance(token, str) or not token.strip() or len(token) > 4096:
            return None
        if self.is_admin(token):
            return Viewer("admin")
        return Viewer("merchant", merchant_id_for(token))

    @staticmethod
    def same_token(a: str, b: str) -> bool:
        return hmac.compare_digest(a.encode(), b.encode())

    def is_admin(self, token: str | None) -> bool:
        """Whether token is an admin token, compared in constant time against every one."""
        if not token:
            return False
        candidate = token.encode()
        # No early exit: the time taken does not tell which token matched, or how much of one.
        matches = [hmac.compare_digest(candidate, admin) for admin in self._admin_tokens]
        return any(matches)
