"""Client side of the daemon's local API, for the `rekam` CLI (stdlib only: the CLI starts fast).

The CLI's credential is the daemon's local token (`api.token` beside `api.json`, mode 0640 inside
the 0700 state directory: in practice root). `daemon_url` reads it with the URL and `call` sends it
as `X-Rekam-Token` when no operator session is given; a user who cannot read it gets the API's 401.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from firmware.errors import ApiError
from firmware.system import i18n

TOKEN_HEADER = "X-Rekam-Token"
_local_tokens: dict[str, str] = {}  # url -> the local token read with it (one daemon per state dir)


def daemon_url(state_dir: Path) -> str | None:
    """URL of the running daemon's API for this state directory, or None if it is not running."""
    try:
        info = json.loads((state_dir / "api.json").read_text())
        url, pid = str(info["url"]), int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:
        _remember_token(url, state_dir)
        return url  # it runs as another user (rekam): it is there, use its API
    except OSError:
        return None
    _remember_token(url, state_dir)
    return url


def _remember_token(url: str, state_dir: Path) -> None:
    try:
        token = (state_dir / "api.token").read_text().strip()
    except OSError:
        return  # not readable for this user: requests go without it (and get 401 where it is needed)
    if token:
        _local_tokens[url] = token


def call(url: str, method: str, path: str, body: Any = None, timeout: float = 600, token: str | None = None,
         raw: bool = False) -> Any:
    """One JSON request to the daemon (`token`: an operator session; `raw`: return the body bytes)."""
    data = json.dumps(body).encode() if body is not None else None
    # The daemon words its answers (reasons, errors, hints) in the CLI's language ($REKAM_LANG / [kit] language).
    headers = {"Content-Type": "application/json", "X-Rekam-Lang": i18n.get_language()}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif url in _local_tokens:
        headers[TOKEN_HEADER] = _local_tokens[url]
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body_bytes = r.read()
            return body_bytes if raw else json.loads(body_bytes or b"null")
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail")
        except ValueError:
            detail = e.reason
        raise ApiError(e.code, detail) from None
