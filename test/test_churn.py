"""Hundreds of sessions opened and closed in a row leave nothing behind.

Every way a session ends is covered (CLOSE, a closing handshake without CLOSE, a dropped TCP
connection, mid-speech, mid-action, before INIT). Afterwards the server holds no more
sessions, tasks, threads, file descriptors or session objects than after a warm-up.

The garbage collector is off while sessions churn, so objects kept only by a reference
cycle stay countable: a session must be freed by reference counting alone, the moment it
closes, not at some later collection. Likewise for what a speaking session makes, on both
engines (the MuseTalk one as its GPU stand-in).
"""

from __future__ import annotations

import gc
from collections import Counter

import pytest

from .churn_support import (
    KINDS,
    churn,
    live_objects,
    rtc_session,
    settled,
    snapshot,
    task_names,
    wait_idle,
)
from .musetalk_tiny import speech
from .wsclient import Client, chunk_msg

SESSIONS = 240
RTC_SESSIONS = 8


async def test_churn_leaves_no_session_task_thread_fd_or_object(server):
    await churn(server, 16)  # warm-up: the avatar cache, the executor's threads
    await wait_idle(server)
    gc.collect()
    before = snapshot(server)
    gc.disable()
    try:
        done = await churn(server, SESSIONS, start=16)
        await wait_idle(server)
        after = await settled(server, before)
    finally:
        gc.enable()
    assert set(done) == set(KINDS) and sum(done.values()) == SESSIONS
    assert after["sessions"] == 0 and not server.services.sessions._reserved
    assert task_names(after) == task_names(before), (before["tasks"], after["tasks"])
    assert after["threads"] <= before["threads"] + 2, (before["threads"], after["threads"])
    assert after["fds"] <= before["fds"] + 4, (before["fds"], after["fds"])
    # freed by reference counting (the GC was off): no Session, stream, sink or encoder left
    assert after["objects"] - before["objects"] == {}, (before["objects"], after["objects"])


async def test_webrtc_churn_leaves_no_peer_track_or_session(make_server):
    server = make_server(rtc_host_addresses=["127.0.0.1"], default_width=256, default_height=256)
    await rtc_session(server)  # warm-up
    await wait_idle(server)
    gc.collect()
    before = snapshot(server)
    gc.disable()
    try:
        for _ in range(RTC_SESSIONS):
            await rtc_session(server)
        await wait_idle(server)
        # ours are freed by reference counting: aiortc's peer connections keep reference
        # cycles of their own, but none of them reaches a peer, track or session of ours
        left = live_objects() - before["objects"]
    finally:
        gc.enable()
    gc.collect()  # aiortc's own cycles: their sockets and tasks must go too
    after = await settled(server, before)
    assert left == {}, left
    assert after["sessions"] == 0 and not server.app.state.rtc_hub.peers
    assert task_names(after) == task_names(before), (before["tasks"], after["tasks"])
    assert after["threads"] <= before["threads"] + 2, (before["threads"], after["threads"])
    assert after["fds"] <= before["fds"] + 4, (before["fds"], after["fds"])
    assert after["objects"] - before["objects"] == {}, (before["objects"], after["objects"])


async def _say(client: Client, seed: int) -> None:
    """One utterance of 8 frames, to its SPEECH_ENDED."""
    await client.send(chunk_msg(client.session_id, speech(8, seed).tobytes()))
    await client.msg("END_OF_SPEECH")
    done = await client.recv_until(lambda m: m["type"] == "SPEECH_ENDED", timeout=60)
    assert done["frames"] == 8


@pytest.mark.parametrize("engine", ["geometric", "musetalk"])
async def test_speech_leaves_no_object_of_ours_to_the_collector(make_server, engine, tmp_path):
    """What speaking makes (jobs, frames, slots, futures' callbacks) is freed by reference
    counting as soon as it is done: with the collector off, a collection then finds no object
    of this service's among the unreachable ones. A MuseTalk job held by its own future's
    callback was such a cycle: every job's faces and frames lived until a full collection
    (~1 GB at 16 stand-in sessions, docs/BENCHMARKS.md section 4)."""
    standin = {"engine": "musetalk", "gpu_standin": "h100", "model_path": tmp_path / "none"}
    server = make_server(default_width=256, default_height=256,
                         **(standin if engine == "musetalk" else {}))
    client, reply = await Client.connect(server.ws, "u1")
    assert reply["type"] == "INIT_SUCCESS"
    client.decode = False
    await _say(client, 0)  # warm-up: what the first utterance caches for good
    gc.collect()
    gc.disable()
    try:
        for seed in (1, 2):
            await _say(client, seed)
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage
        gc.collect()
        ours = Counter(type(o).__qualname__ for o in gc.garbage
                       if type(o).__module__.startswith("websocket_service"))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    await client.close()
    assert ours == Counter(), ours
