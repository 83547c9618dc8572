"""Is the Hugging Face Hub reachable? Answered in about a second, before `datasets` or
`huggingface_hub` spend half a minute on retries (and `datasets` seconds on its import).

Offline when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set, or when one TCP connection to
the Hub endpoint (``HF_ENDPOINT``, default https://huggingface.co) does not open within
:data:`PROBE_TIMEOUT_S`. Behind an HTTP(S) proxy no direct probe says anything, so none is made.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 2.0
_TRUE = {"1", "ON", "YES", "TRUE"}
_probe_result: dict[str, str | None] = {}  # endpoint -> reason (one probe per process and endpoint)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in _TRUE


def _probe(host: str, port: int) -> str | None:
    outcome: list[str | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{host}:{port} cannot be reached ({err.strerror or err})")

    # A thread bounds the name lookup too, which socket timeouts do not cover.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    if not outcome:
        return f"{host}:{port} did not answer within {PROBE_TIMEOUT_S:g} s"
    return outcome[0]


def hub_offline_reason() -> str | None:
    """Why the Hub cannot be used now ("HF_HUB_OFFLINE is set", "huggingface.co:443 did not
    answer within 2 s", ...), or None when it looks reachable."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_flag(name):
            return f"{name} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _probe_result:
        url = urlparse(endpoint)
        port = url.port or (80 if url.scheme == "http" else 443)
        _probe_result[endpoint] = _probe(url.hostname or "huggingface.co", port)
    return _probe_result[endpoint]


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")).expanduser()


def cache_may_hold(repo: str) -> bool:
    """Whether the local `datasets` or Hub cache has an entry for ``repo`` ("wikitext",
    "Salesforce/wikitext", "gpt2"): then loading it offline is worth trying."""
    name = repo.split("/")[-1].lower()
    roots = [
        Path(os.environ["HF_DATASETS_CACHE"]).expanduser() if os.environ.get("HF_DATASETS_CACHE") else _hf_home() / "datasets",
        Path(os.environ["HF_HUB_CACHE"]).expanduser() if os.environ.get("HF_HUB_CACHE") else _hf_home() / "hub",
    ]
    for root in roots:
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            # datasets: "wikitext/" or "salesforce___wikitext/"; hub: "datasets--Salesforce--wikitext", "models--gpt2"
            parts = entry.name.lower().replace("___", "--").split("--")
            if name in parts:
                return True
    return False


def go_offline() -> None:
    """Make `datasets` and `huggingface_hub` read only their caches from here on (no retries)."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"  # for modules imported later
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
