"""One trained, registered, gated and built model per session, served by a real `bentoml serve`
process on 127.0.0.1, plus helpers to build requests from the real warehouse data."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any

import pytest

from sofare.serving import schemas


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, url: str) -> None:
        self.url = url

    def post(self, path: str, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            text = error.read().decode()
            try:
                return error.code, json.loads(text)
            except ValueError:
                return error.code, text

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.status, response.read().decode()


@pytest.fixture(scope="session")
def served(model_home):
    from sofare.serving import bento

    cfg = model_home["cfg"]
    server = bento.Server(
        cfg,
        model_home["built"]["bento"],
        free_port(),
        "stable",
        SOFARE_SERVING__MAX_BATCH_WINDOWS="8",
        SOFARE_SERVING__LOG_MAX_BYTES="16384",
        SOFARE_SERVING__LOG_BACKUPS="2",
    )  # small: the hostile tests make it rotate
    with server:
        yield {**model_home, "client": Client(server.url), "server": server}


def candles_needed(cfg) -> int:
    """The candles of one window of the served model (feature warm-up + lookback - 1), as schemas.request_body."""
    return cfg.features.warmup_bars + max(cfg.training.search_space.lookback) - 1


def window_payload(
    cfg, end: str = "2024-03-20T12:00:00+00:00", candles: int | None = None, context: bool = False
) -> dict[str, Any]:
    return schemas.request_body(cfg, datetime.fromisoformat(end), candles, context)
