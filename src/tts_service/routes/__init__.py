"""HTTP routes, one module per API family; each maps a request to the gateway and its answer to HTTP."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tts_service.gateway import Gateway


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # set by the front service when its worker starts


GatewayDep = Annotated[Gateway, Depends(_gateway)]
