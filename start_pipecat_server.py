"""Start the pipecat avatar bot (alias of ``python -m websocket_service.pipecat.bot``).

    python start_pipecat_server.py [--room-url URL --token TOKEN] [--config FILE]
                                   [--verbose] [--skip-checks] [--host H] [--port P]

Needs the pipecat extra: ``pip install -e '.[pipecat]'`` (Python 3.11+).
"""

from websocket_service.pipecat.bot import main

if __name__ == "__main__":
    main()
