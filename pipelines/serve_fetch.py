"""Image URLs for the endpoint, fetched only from allow-listed hosts (no server-side request forgery).

Rules: http(s) only; the URL's host must equal an allow-list entry (``host`` or ``host:port``,
case-insensitive, no wildcards, so an IP literal must be listed as such); redirects are followed
by hand, at most :data:`MAX_REDIRECTS`, each target checked like the first URL; the whole fetch
has one deadline and the body one byte cap (counted as it streams, whatever Content-Length says);
no proxy from the environment, no cookies. The allow-list is by name: a listed host that resolves
to an internal address is the operator's choice.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urljoin, urlsplit

import aiohttp

from instseg_core.io import redact
from pipelines.serve_protocol import RequestError

MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


def allowed_host(url: str, allowlist: tuple[str, ...]) -> bool:
    """Whether ``url`` is http(s) and its host (or ``host:port``) is in ``allowlist``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    if parts.scheme.lower() not in ("http", "https") or not host:
        return False
    default_port = 443 if parts.scheme.lower() == "https" else 80
    candidates = {host, f"{host}:{port or default_port}"}
    if ":" in host:  # IPv6: urlsplit drops the brackets, an entry may be written with them
        candidates |= {f"[{host}]", f"[{host}]:{port or default_port}"}
    return any(entry in candidates for entry in allowlist)


def new_session() -> aiohttp.ClientSession:
    """A client session for image fetches: no environment proxies, no cookie jar."""
    return aiohttp.ClientSession(trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                                 headers={"User-Agent": "instseg-serve"})


async def fetch_image(session: aiohttp.ClientSession, url: str, allowlist: tuple[str, ...],
                      timeout_s: float, max_bytes: int) -> bytes:
    """The body of ``url`` under the rules above; a refusal or failure is a :class:`RequestError`."""
    try:
        return await asyncio.wait_for(_fetch(session, url, allowlist, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(422, f"image URL {redact(url)}: no complete answer within {timeout_s:g} s") from None
    except aiohttp.ClientError as e:
        raise RequestError(422, f"image URL {redact(url)}: cannot fetch: {redact(str(e)) or type(e).__name__}") from None


async def _fetch(session: aiohttp.ClientSession, url: str, allowlist: tuple[str, ...], max_bytes: int) -> bytes:
    if not allowlist:
        raise RequestError(403, "image URLs are not accepted by this endpoint (url_allowlist is empty); "
                                "send the image as base64")
    for _ in range(MAX_REDIRECTS + 1):
        if not allowed_host(url, allowlist):
            raise RequestError(403, f"image URL host of {redact(url)} is not in url_allowlist")
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status in _REDIRECTS and "Location" in resp.headers:
                url = urljoin(str(resp.url), resp.headers["Location"])
                continue
            if resp.status != 200:
                raise RequestError(422, f"image URL {redact(url)} answered HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise RequestError(413, f"image URL {redact(url)} is {resp.content_length} bytes, "
                                        f"more than url_max_bytes={max_bytes}")
            chunks, total = [], 0
            async for chunk in resp.content.iter_chunked(_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    raise RequestError(413, f"image URL {redact(url)} sends more than url_max_bytes={max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    raise RequestError(422, f"image URL {redact(url)}: more than {MAX_REDIRECTS} redirects")
