"""Which environment variables may hold judge keys and which hosts judges may call.

A reward config is swappable at runtime (``PUT /v1/config``), so a backend spec
naming an environment variable (``api_key_env``) or an endpoint (``base_url``)
could otherwise make the server send any of its variables to any host. These
two lists are server settings (``ServerConfig.judge_key_envs`` and
``judge_hosts``), outside the reward config; every spec is checked against them
before a backend is built for serving.

Host entries are URLs ``scheme://host[:port][/path]``. A judge URL is allowed
when its scheme and host equal an entry's (host names compared in lower case,
without a trailing dot; IP addresses literally, so ``http://2130706433`` is not
``http://127.0.0.1``), its port equals the entry's when the entry names one (an
entry without a port allows every port of that host), and its path starts with
the entry's path at a ``/`` boundary. URLs with a user name or password, a
query or a fragment are refused. A Gemini spec without ``base_url`` calls
:data:`GEMINI_DEFAULT_URL`, which must be allowed like any other.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import BaseModel

GEMINI_DEFAULT_URL = "https://generativelanguage.googleapis.com"
"""Where the google-genai client sends requests when a Gemini spec has no ``base_url``."""

DEFAULT_JUDGE_KEY_ENVS = ("GEMINI_API_KEY",)
"""Key variables allowed by default: the one the shipped configs name."""

DEFAULT_JUDGE_HOSTS = (GEMINI_DEFAULT_URL, "http://127.0.0.1", "http://localhost", "http://[::1]")
"""Hosts allowed by default: the public Gemini API and this machine's loopback (any port)."""


class AllowlistError(ValueError):
    """A spec names a key variable or a host outside the allowlist; ``field`` is the spec field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int | None
    path: str

    def admits(self, other: "_Origin") -> bool:
        if (self.scheme, self.host) != (other.scheme, other.host):
            return False
        if self.port is not None and self.port != (other.port if other.port is not None else _default_port(other.scheme)):
            return False
        prefix = self.path.rstrip("/")
        return not prefix or other.path == prefix or other.path.startswith(prefix + "/")


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def parse_url(url: str) -> _Origin:
    """Scheme, host, port and path of an ``http(s)`` URL.

    Raises:
        ValueError: not ``http``/``https``, no host, a user name or password, a
            query or fragment, or an invalid port (the message names the URL).
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: only http and https URLs are allowed")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r}: URLs with a user name or password are not allowed")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: URLs with a query or fragment are not allowed")
    return _Origin(parts.scheme, parts.hostname.lower().rstrip("."), port, parts.path)


class JudgeAllowlist:
    """The key variables and hosts judge backends may use.

    Args:
        key_envs: environment variable names allowed as ``api_key_env`` (exact, case-sensitive).
        hosts: allowed URLs (see the module docstring).

    Raises:
        ValueError: a host entry is not a valid ``http(s)`` URL.
    """

    def __init__(self, key_envs: Iterable[str] = DEFAULT_JUDGE_KEY_ENVS,
                 hosts: Iterable[str] = DEFAULT_JUDGE_HOSTS) -> None:
        self.key_envs = frozenset(key_envs)
        self.hosts = tuple(hosts)
        self._origins = tuple(parse_url(entry) for entry in self.hosts)

    def check(self, spec: BaseModel) -> None:
        """Refuse ``spec`` if its ``api_key_env`` or the URL it calls is not allowed.

        Raises:
            AllowlistError: ``field`` is ``api_key_env`` or ``base_url``; the message
                names the value and the allowed ones.
        """
        fields = type(spec).model_fields
        key_env = getattr(spec, "api_key_env", None) if "api_key_env" in fields else None
        if key_env is not None and key_env not in self.key_envs:
            raise AllowlistError("api_key_env", (
                f"api_key_env {key_env!r} is not an allowed judge key variable; this server allows "
                f"{sorted(self.key_envs)} (ServerConfig.judge_key_envs)"))
        if "base_url" not in fields:
            return
        url = getattr(spec, "base_url", None)
        if url is None and getattr(spec, "type", None) == "gemini":
            url = GEMINI_DEFAULT_URL
        if url is None:
            return
        try:
            origin = parse_url(url)
        except ValueError as exc:
            raise AllowlistError("base_url", f"base_url {exc}") from exc
        if not any(allowed.admits(origin) for allowed in self._origins):
            raise AllowlistError("base_url", (
                f"base_url {url!r} is not an allowed judge host; this server allows {list(self.hosts)} "
                "(ServerConfig.judge_hosts)"))
