"""Run the avatar bot.

    python -m websocket_service.pipecat.bot                  # SmallWebRTC + browser UI, offline
    python -m websocket_service.pipecat.bot --room-url URL   # join a Daily room instead

With no room URL it serves its own browser page at ``http://HOST:PORT/client/`` (default
``http://localhost:7860``; nothing on it comes from the internet) and talks to each visitor
over SmallWebRTC, peer to peer, with no cloud service. Without ``BOT_SERVICES`` the avatar repeats what it heard
(Silero VAD segments the speech), lip-synced. ``--config`` reads the service's settings
(``ENGINE``, ``MODEL_PATH``, ``AVATARS_DIR``, ``DEFAULT_AVATAR``, ``ICE_SERVERS``,
``RTC_HOST_ADDRESSES``, ...) from an env file instead of ``.env``. Serving beyond this
machine (``--host`` other than localhost) needs ``AUTH_TOKEN``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from loguru import logger
from pipecat.pipeline.worker import PipelineWorker
from pipecat.transports.base_transport import BaseTransport
from pipecat.workers.runner import WorkerRunner

from ..config import Settings
from .pipeline import avatar_service, build_worker, check, load_services, transport_params
from .service import AvatarService

log = logging.getLogger(__name__)

#: hosts that serve this machine only; any other --host needs AUTH_TOKEN
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m websocket_service.pipecat.bot",
                                description="The MuseTalk avatar as a pipecat bot.")
    p.add_argument("--room-url", help="join this Daily room (needs the daily extra of pipecat-ai)")
    p.add_argument("--token", help="Daily meeting token for --room-url")
    p.add_argument("--config", type=Path, help="env file with the service settings (default .env)")
    p.add_argument("--verbose", action="store_true", help="debug logging (pipecat's too)")
    p.add_argument("--skip-checks", action="store_true",
                   help="start without loading the engine, avatar and VAD first "
                        "(they load on the first connection)")
    p.add_argument("--host", default="localhost", help="SmallWebRTC: address to serve on")
    p.add_argument("--port", type=int, default=7860, help="SmallWebRTC: port to serve on")
    return p.parse_args(argv)


def load_config(path: Path | None) -> Settings:
    if path is not None and not path.is_file():
        raise SystemExit(f"--config {path}: no such file")
    return Settings(_env_file=path) if path is not None else Settings()


def setup_logging(verbose: bool) -> None:
    level = "DEBUG" if verbose else "INFO"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.remove()  # pipecat logs through loguru, at DEBUG by default
    logger.add(sys.stderr, level=level)


def daily_transport(room_url: str, token: str | None, width: int, height: int) -> BaseTransport:
    """A Daily transport that joins ``room_url`` as "Avatar" (needs the daily extra)."""
    from pipecat.transports.daily.transport import (  # noqa: PLC0415 - the daily extra
        DailyParams,
        DailyTransport,
    )

    return DailyTransport(room_url, token, "Avatar", transport_params(DailyParams, width, height))


def daily_worker(transport: BaseTransport, processor: AvatarService) -> PipelineWorker:
    """The bot's pipeline on a Daily transport; it ends when the user leaves."""
    worker = build_worker(transport, processor, load_services())

    @transport.event_handler("on_participant_left")
    async def _left(_transport: object, _participant: object, _reason: object) -> None:
        await worker.cancel()

    return worker


async def run_daily(args: argparse.Namespace, config: Settings) -> None:
    processor = avatar_service(config)
    size = (config.default_width, config.default_height)
    if not args.skip_checks:
        size = await asyncio.to_thread(check, processor, config)
    runner = WorkerRunner()
    transport = daily_transport(args.room_url, args.token, *size)
    await runner.add_workers(daily_worker(transport, processor))
    await runner.run()


def serve(args: argparse.Namespace, config: Settings) -> None:
    import uvicorn  # noqa: PLC0415

    from .server import create_bot_app  # noqa: PLC0415

    if args.host not in LOOPBACK and not config.auth_token:
        raise SystemExit(f"--host {args.host} serves the bot beyond this machine: set AUTH_TOKEN "
                         "(then open the page with ?token=...)")
    app = create_bot_app(config, load=not args.skip_checks)
    query = "?token=<AUTH_TOKEN>" if config.auth_token else ""
    print(f"avatar bot: open http://{args.host}:{args.port}/client/{query}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="debug" if args.verbose else "info")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    config = load_config(args.config)
    if args.room_url:
        asyncio.run(run_daily(args, config))
    else:
        serve(args, config)


if __name__ == "__main__":
    main()
