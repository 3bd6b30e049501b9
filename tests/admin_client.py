"""GET helpers for skylb's admin server, shared by the server test harnesses."""

from __future__ import annotations

import json
from typing import Any

import aiohttp


class AdminClient:
    """Mixin: the harness gives `http` and `admin_port`."""

    http: aiohttp.ClientSession

    @property
    def admin_port(self) -> int:
        raise NotImplementedError

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        async with self.http.get(url, headers=headers) as response:
            return response.status, await response.text()

    async def state(self) -> dict[str, Any]:
        status, text = await self.get("/state")
        assert status == 200
        result: dict[str, Any] = json.loads(text)
        return result
