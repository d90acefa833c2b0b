"""Limits and quotas: RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo, never a hang."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.conftest import StartServer, collect, completed_of, status_details, stream_request
from tests.test_auth import KEY_A, KEY_B, bearer, keys_file
from tokenwire.v1 import respond_pb2 as pb

SLOW = {"tokenwire.sim/inter-token-ms": "20", "tokenwire.sim/answer-tokens": "200"}


def quota_subjects(error: grpc.aio.AioRpcError) -> list[str]:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                    failure = error_details_pb2.QuotaFailure()
                    detail.Unpack(failure)
                    return [v.subject for v in failure.violations]
    return []


async def test_server_wide_concurrency_is_bounded(start_server: StartServer) -> None:
    server = await start_server(max_concurrent_calls=2, admission_wait=0.05)
    running = [server.stub.StreamRespond(stream_request(labels=SLOW)) for _ in range(2)]
    for call in running:
        await call.read()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(stream_request()))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.error_info.reason == "SERVER_CONCURRENCY_EXCEEDED"
    assert details.retry_info is not None and details.retry_info.retry_delay.seconds >= 1
    assert quota_subjects(raised.value) == ["server"]
    for call in running:
        call.cancel()
    # Slots come back: the server keeps serving.
    completed = completed_of(await collect(server.stub.StreamRespond(stream_request())))
    assert completed.verification.status == pb.VERIFICATION_STATUS_VERIFIED


@pytest.fixture
async def tenants(start_server: StartServer, tmp_path: Path):
    path = keys_file(tmp_path / "keys.yaml", ("acme", KEY_A), ("globex", KEY_B))
    return start_server, path


async def test_tenant_concurrency_is_per_tenant(tenants) -> None:
    start_server, path = tenants
    server = await start_server(auth_keys_file=path, tenant_max_concurrent_calls=1)
    first = server.stub.StreamRespond(stream_request(labels=SLOW), metadata=bearer(KEY_A))
    await first.read()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(stream_request(), metadata=bearer(KEY_A)))
    details = status_details(raised.value)
    assert details.error_info.reason == "TENANT_CONCURRENCY_EXCEEDED"
    assert quota_subjects(raised.value) == ["tenant:acme"]
    # Another tenant is not affected.
    await collect(server.stub.StreamRespond(stream_request(), metadata=bearer(KEY_B)))
    first.cancel()


async def test_tokens_per_minute_is_a_token_bucket(tenants) -> None:
    start_server, path = tenants
    server = await start_server(auth_keys_file=path, tenant_tokens_per_minute=100)
    request = stream_request()  # 64 tokens each
    await collect(server.stub.StreamRespond(request, metadata=bearer(KEY_A)))  # 100 -> 36
    await collect(server.stub.StreamRespond(request, metadata=bearer(KEY_A)))  # 36 -> -28
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(server.stub.StreamRespond(request, metadata=bearer(KEY_A)))
    details = status_details(raised.value)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.error_info.reason == "TOKENS_PER_MINUTE_EXCEEDED"
    # 28 tokens short at 100/min: about 17 s until the bucket is positive again.
    delay = details.retry_info.retry_delay.ToNanoseconds() / 1e9
    assert 10 < delay < 25
    unary = pb.RespondRequest(messages=request.messages)
    with pytest.raises(grpc.aio.AioRpcError):
        await server.stub.Respond(unary, metadata=bearer(KEY_A))
    await collect(server.stub.StreamRespond(request, metadata=bearer(KEY_B)))
