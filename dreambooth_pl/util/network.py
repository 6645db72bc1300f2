"""Is a server there? Asked in seconds, before a library spends minutes retrying a connection."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def server_reachable(url: str, timeout: float) -> bool:
    """A TCP connection to the server (or the HTTPS proxy in use) within `timeout` seconds."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy and url.startswith("https") else url)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout):
            return True
    except (OSError, TypeError):
        return False
