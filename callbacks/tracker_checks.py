"""Cheap checks, made at `tl.prepare`, that a tracker's run can be created at its first report.

Without them a missing W&B login or an MLflow server that is down fails inside `tl.log`, at the
first report, after minutes of training (and, for MLflow, minutes of HTTP retries). Each check
reads local files and the environment, or opens one TCP connection with a short timeout; none
creates anything or sends a request to the service. A check that cannot decide lets the run go on.
"""

from __future__ import annotations

import configparser
import netrc
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

_WANDB_CLOUD = "https://api.wandb.ai"
_WANDB_NOT_ONLINE = ("offline", "disabled", "dryrun")


def check_wandb_credentials(init_kwargs: dict[str, Any]) -> None:
    """Raise PermissionError, naming the fixes, when a W&B run would start online without any
    credentials: no WANDB_API_KEY (or identity token file) and no netrc entry for the W&B host."""
    mode = init_kwargs.get("mode") or os.environ.get("WANDB_MODE") or "online"
    if (mode in _WANDB_NOT_ONLINE or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1")
            or init_kwargs.get("anonymous") in ("allow", "must")):
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    base_url = os.environ.get("WANDB_BASE_URL") or _wandb_settings_base_url() or _WANDB_CLOUD
    host = urlparse(base_url).hostname or base_url
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        if path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None:
            return
    except (OSError, netrc.NetrcParseError):
        return  # a netrc we cannot read: wandb may read it; let it decide
    raise PermissionError(
        f"WandB: this machine has no W&B credentials for {base_url} (no WANDB_API_KEY, no entry in "
        f"{path}), so the run would fail at its first report. Run `wandb login` once here, set "
        'WANDB_API_KEY, or log offline: WandB(..., mode="offline") or WANDB_MODE=offline '
        "(`wandb sync` uploads the run later)"
    )


def _wandb_settings_base_url() -> str | None:
    """The host `wandb login --host` saved in W&B's settings file, if any."""
    directory = os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb"
    settings = configparser.ConfigParser()
    try:
        settings.read(Path(directory) / "settings")
        return settings.get("default", "base_url", fallback=None)
    except (OSError, configparser.Error):
        return None


def check_mlflow_server(tracking_uri: str | None, timeout: float = 5.0) -> None:
    """Raise ConnectionError, naming the URI and the fixes, when an http(s) tracking server
    accepts no connection. Other stores (local SQLite, databricks, ...) are not checked here."""
    if not tracking_uri:
        return
    parsed = urlparse(tracking_uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return
    except OSError as error:
        raise ConnectionError(
            f"MLflow: the tracking server {tracking_uri} cannot be reached ({error.strerror or error}), "
            "so the run would fail at its first report. Start it (`mlflow server`), fix tracking_uri "
            "or MLFLOW_TRACKING_URI, or leave both unset for a local store in dir="
        ) from None
