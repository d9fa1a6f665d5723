"""Fail-fast guard around ``pretrained=True`` downloads.

timm and torchvision download weights on first use. On a machine without network access that either hangs on
DNS/TCP timeouts or ends in a long, library-specific traceback. Before handing over to the library we check,
cheaply, whether the weights are already cached (then no network is needed) and otherwise whether the download
host answers at all, so the user gets one clear message and the ``weights=<local file>`` alternative at once.
"""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_TIMEOUT_S = 3.0


def offline_env_var() -> str | None:
    """Name of the first offline flag set to a true value in the environment, if any."""
    for var in OFFLINE_ENV_VARS:
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return var
    return None


def host_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds.

    The probe runs in a daemon thread because ``socket.create_connection`` bounds only the connect, not the DNS
    lookup, which can block far longer on a machine whose resolver is unreachable.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name=f"densekit-probe-{host}", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def offline_message(what: str, source: str, reason: str) -> str:
    return (
        f"pretrained=True for {what}: the weights are not in the local cache and would be downloaded from "
        f"{source}, but {reason}. This machine seems to be offline. Pass weights=<local checkpoint file> "
        f"instead (e.g. create_backbone(..., weights='path/to/weights.pth')), or copy the weights into the "
        f"timm / torch hub cache."
    )


def ensure_download_possible(what: str, source: str, cached: bool) -> None:
    """Raise at once if weights must be downloaded but the machine is evidently offline.

    Args:
        what: The model, as named to the user.
        source: URL or hub id the library would download from.
        cached: Whether the weights are already in the local cache (then nothing is checked).

    Raises:
        RuntimeError: an offline flag is set, or the download host does not answer within a few seconds.
    """
    if cached:
        return
    env_var = offline_env_var()
    if env_var is not None:
        raise RuntimeError(offline_message(what, source, f"{env_var} is set"))
    host = urlparse(source).hostname if "://" in source else "huggingface.co"
    if host and not host_reachable(host):
        reason = f"{host}:443 could not be reached (probe timeout {PROBE_TIMEOUT_S:g} s)"
        raise RuntimeError(offline_message(what, source, reason))


@contextmanager
def download_errors_explained(what: str, source: str) -> Iterator[None]:
    """Re-raise any failure of the library's own download/load as one RuntimeError naming the alternative."""
    try:
        yield
    except Exception as err:  # the libraries raise OSError, URLError, HTTPError, hub errors, ...
        raise RuntimeError(
            f"pretrained=True for {what}: fetching weights from {source} failed ({type(err).__name__}: {err}). "
            f"If this machine is offline, pass weights=<local checkpoint file> instead."
        ) from err


def torch_hub_cached(url: str) -> bool:
    """Whether ``url`` is already in torch.hub's checkpoint cache (where torchvision and timm's url path look)."""
    import torch.hub

    filename = os.path.basename(urlparse(url).path)
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", filename))


def hf_hub_cached(hub_id: str, filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")) -> bool:
    """Whether any of ``filenames`` of the Hugging Face repo ``hub_id`` (``repo`` or ``repo@revision``) is cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    repo_id, _, revision = hub_id.partition("@")
    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        if isinstance(path, str) and os.path.isfile(path):
            return True
    return False
