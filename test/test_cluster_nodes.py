"""The service on a two-node Ray cluster on this machine (two raylets, ``ray.cluster_utils``):
a Serve proxy on each node; the head node has no GPU, the worker node two, declared to Ray, so
both session replicas (REPLICA_GPUS=1) run on the worker node, each with a GPU of its own.

Each session is opened through the head node's proxy, where it does not run, and watched and
bridged through the worker node's, controlled through the head node's.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator

import httpx
import pytest
import websockets

from websocket_service.cluster import runner
from websocket_service.cluster.settings import ClusterSettings
from websocket_service.config import Settings
from websocket_service.manager import Services

from .cluster_support import (
    OPERATOR,
    SECRET,
    Cluster,
    Peer,
    bearer,
    envelope,
    open_session,
    poll,
    replica,
    same_frames,
    user_token,
)
from .conftest import FIXTURES
from .live_server import free_port
from .wsclient import read_wav

MAX_SESSIONS = 4  # per replica: capacity 8


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Cluster]]:
    """(the head node's proxy, the worker node's proxy)."""
    from ray.cluster_utils import Cluster as RayCluster

    head_port, worker_port = free_port(), free_port()
    # both proxies run on this machine: the worker node's binds a port of its own (Serve reads
    # this in each proxy; the head node's keeps PORT)
    os.environ["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(worker_port)
    try:
        nodes = RayCluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
        nodes.add_node(num_cpus=1, num_gpus=2)
    finally:
        del os.environ["RAY_SERVE_WORKER_PROXY_HTTP_PORT"]
    settings = Settings(avatars_dir=tmp_path_factory.mktemp("nodes-avatars"), port=head_port,
                        host="127.0.0.1", max_sessions=MAX_SESSIONS, init_timeout_s=5.0,
                        max_speech_lag_frames=10_000, send_queue_frames=250,
                        catch_up_in_pauses=False, jwt_secret=SECRET, auth_token="operator-token")
    Services(settings).ensure_default_avatar()
    spec = ClusterSettings(replicas=2, replica_cpus=0.5, replica_gpus=1, drain_timeout_s=5.0,
                           ray_address=nodes.address)
    try:
        runner.start_ray(spec)
        runner.deploy(settings, spec)
        yield Cluster(head_port), Cluster(worker_port)
    finally:
        runner.shutdown(False)
        import ray
        ray.shutdown()
        nodes.shutdown()


def test_each_replica_has_a_gpu_of_its_own(proxies: tuple[Cluster, Cluster]) -> None:
    head, worker = proxies
    for proxy in proxies:  # either node's proxy answers for the whole cluster
        assert proxy.get("/health")["replicas"] == {"up": 2, "target": 2}
    import ray
    gpu_node = next(n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU"))
    replicas = head.get("/sessions")["replicas"]
    assert [r["node_id"] for r in replicas] == [gpu_node] * 2  # where the GPUs are ...
    assert sorted(r["gpus"] for r in replicas) == [["0"], ["1"]]  # ... a device id each


async def test_a_session_is_usable_through_either_nodes_proxy(
        proxies: tuple[Cluster, Cluster]) -> None:
    head, worker = proxies
    # opened through the head node's proxy, which has no replica on its node
    owners = [await open_session(head, f"owner{i}") for i in range(2)]
    assert len({replica(r) for _, r in owners}) == 2
    pcm = read_wav(FIXTURES / "short_16k.wav")
    async with httpx.AsyncClient(base_url=head.http, timeout=30) as http:
        fans = []
        for i, (owner, reply) in enumerate(owners):
            sid = owner.session_id
            # a view grant through the head node's proxy; the viewer and the bridge through the
            # worker node's; a control through the head node's
            grant = await http.post(f"/sessions/{sid}/view_token", headers=bearer(f"owner{i}"))
            assert grant.status_code == 200, grant.text
            fan = await Peer.open(worker.ws, f"fan{i}", (sid, grant.json()["view_token"]))
            got = await fan.until(lambda fan=fan: fan.events and fan.events[0])
            assert got["type"] == "INIT_SUCCESS" and replica(got) == replica(reply), got
            fans.append(fan)
            async with websockets.connect(f"{worker.ws}/musetalk/v1/bridge/{sid}"
                                          f"?token={user_token(owner.user_id)}") as bridge:
                await bridge.send(json.dumps(envelope("BRIDGE_CONFIG", sid, {"format": "rgb24"})))
                assert json.loads(await bridge.recv())["type"] == "BRIDGE_READY"
            ack = await http.post(f"/sessions/{sid}/interrupt", headers=bearer(owner.user_id))
            assert ack.status_code == 200 and ack.json()["session_id"] == sid, ack.text
        chunks = await asyncio.gather(*(owner.speak(pcm) for owner, _ in owners))
        for (owner, _), fan, n in zip(owners, fans, chunks, strict=True):
            await fan.until(lambda f=fan, n=n: f.utterances() and len(f.utterances()[0]) >= n)
            await owner.until(lambda o=owner, n=n: o.utterances() and len(o.utterances()[0]) >= n)
            assert owner.utterances() == [list(range(n))]
            assert same_frames(owner, [fan]) > n
        listed = (await http.get("/sessions", headers=OPERATOR)).json()
        assert listed["count"] == 2
    for peer in [*(o for o, _ in owners), *fans]:
        await peer.close()
    async with httpx.AsyncClient(base_url=head.http, timeout=30) as http:
        await poll(http, "/sessions", lambda b: b["count"] == 0)


async def test_a_burst_through_both_proxies_spreads_and_all_of_it_streams(
        proxies: tuple[Cluster, Cluster]) -> None:
    """6 at once at capacity 8, half through each node's proxy: two routers place at once,
    and none of it is refused or gets an HTTP error."""
    head, worker = proxies
    opened = await asyncio.gather(*(open_session(proxy, f"burst{i}{k}")
                                    for k in range(3) for i, proxy in enumerate(proxies)))
    assert [r["type"] for _, r in opened] == ["INIT_SUCCESS"] * 6, opened
    per_replica = sorted(sum(replica(r) == rid for _, r in opened)
                         for rid in {replica(r) for _, r in opened})
    assert per_replica == [3, 3]
    for peer, _ in opened:
        assert await peer.until(lambda peer=peer: len(peer.frames) >= 5)
        assert peer.close_code is None
        await peer.close()

