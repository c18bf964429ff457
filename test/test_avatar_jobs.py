"""At most two avatar preparations run at once, also when requests race each other."""

from __future__ import annotations

import asyncio
import threading

import cv2
import httpx
from skimage import data

from websocket_service.engines.geometric import GeometricEngine


class HeldEngine(GeometricEngine):
    """Preparations of avatars named ``held*`` wait until the test lets them go."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.started = threading.Semaphore(0)

    def prepare_avatar(self, avatar, progress=None) -> None:  # noqa: ANN001
        if avatar.avatar_id.startswith("held"):
            self.started.release()
            assert self.release.wait(30)
        super().prepare_avatar(avatar, progress)


async def test_concurrent_requests_never_run_more_than_two_jobs(make_server) -> None:
    server = make_server(engine_factory=HeldEngine)
    engine = server.services.engine
    ok, png = cv2.imencode(".png", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    assert ok
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as http:
        async def upload(name: str) -> httpx.Response:
            return await http.post(f"/prepare_avatar/{name}",
                                   files={"file": ("face.png", png.tobytes(), "image/png")})

        replies = await asyncio.gather(*(upload(f"held{i}") for i in range(6)))
        codes = sorted(r.status_code for r in replies)
        assert codes == [202, 202, 429, 429, 429, 429], [r.text for r in replies]
        refused = next(r for r in replies if r.status_code == 429).json()
        assert refused["code"] == "RATE_LIMIT_EXCEEDED"
        for _ in range(2):  # both accepted jobs are running
            assert await asyncio.to_thread(engine.started.acquire, True, 30)
        engine.release.set()
        for r in replies:
            if r.status_code == 202:
                status = r.json()["status_url"]
                async with asyncio.timeout(30):
                    while (job := (await http.get(status)).json())["status"] != "done":
                        assert job["status"] != "failed", (job["message"], job["error"])
                        await asyncio.sleep(0.05)
                assert job["progress"] == 1.0
        again = await upload("held-again")
        assert again.status_code == 202  # the slots were given back
        async with asyncio.timeout(30):
            while (await http.get(again.json()["status_url"])).json()["status"] != "done":
                await asyncio.sleep(0.05)
