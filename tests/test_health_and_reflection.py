"""Standard tooling surfaces: grpc.health.v1, server reflection, and buf curl through it."""

from __future__ import annotations

import asyncio
import json
import shutil

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import RunningServer, require_tool

SERVICE = "tokenwire.v1.RespondService"


@pytest.mark.parametrize("service", ["", SERVICE])
async def test_health_answers_serving(server: RunningServer, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_of_an_unknown_service_is_not_found(server: RunningServer) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nope"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_service(server: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    responses = [r async for r in stub.ServerReflectionInfo(iter(requests))]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto


REFLECTION_SERVICES = (
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)


def _reflection_messages(service: str) -> tuple[type, type]:
    """The request and response classes of one reflection version, by their own
    names: a v1 client sends grpc.reflection.v1 messages, not v1alpha ones."""
    package = service.rsplit(".", 1)[0]
    pool = descriptor_pool.Default()
    request = pool.FindMessageTypeByName(f"{package}.ServerReflectionRequest")
    response = pool.FindMessageTypeByName(f"{package}.ServerReflectionResponse")
    return message_factory.GetMessageClass(request), message_factory.GetMessageClass(response)


@pytest.mark.parametrize("service", REFLECTION_SERVICES)
async def test_each_reflection_version_answers_server_reflection_info(
    server: RunningServer, service: str
) -> None:
    """grpcio-reflection serves only v1alpha; tokenwire answers v1 too (grpcurl,
    buf curl and grpc-go ask v1 first, older tools and Postman v1alpha)."""
    request_type, response_type = _reflection_messages(service)
    call = server.channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )
    requests = [
        request_type(list_services=""),
        request_type(file_containing_symbol=SERVICE),
        request_type(file_containing_symbol=service),
        request_type(file_containing_symbol="no.such.Symbol"),
    ]
    listed, described, itself, missing = [r async for r in call(iter(requests))]
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", *REFLECTION_SERVICES} <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    assert "tokenwire/v1/respond.proto" in {f.name for f in files}
    (own,) = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in itself.file_descriptor_response.file_descriptor_proto
    ]
    assert f"{own.package}.{own.service[0].name}" == service
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert missing.original_request.file_containing_symbol == "no.such.Symbol"


async def _grpcurl(*args: str) -> str:
    grpcurl = require_tool("grpcurl")
    process = await asyncio.create_subprocess_exec(
        grpcurl, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_grpcurl_lists_and_describes_both_reflection_versions(
    server: RunningServer,
) -> None:
    names = set((await _grpcurl("-plaintext", server.address, "list")).split())
    assert {SERVICE, "grpc.health.v1.Health", *REFLECTION_SERVICES} <= names
    for service in REFLECTION_SERVICES:
        described = await _grpcurl("-plaintext", server.address, "describe", service)
        assert f"{service} is a service" in described
        assert "rpc ServerReflectionInfo ( stream" in described


async def _buf(*args: str) -> str:
    buf = shutil.which("buf")
    assert buf, "buf comes with the dev extra (buf-bin)"
    process = await asyncio.create_subprocess_exec(
        buf, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_buf_curl_lists_methods_through_reflection(
    server: RunningServer, protocol: str
) -> None:
    """buf curl can be told which reflection version to speak: both work."""
    out = await _buf(
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--reflect-protocol",
        protocol,
        "--list-methods",
        f"http://{server.address}",
    )
    methods = set(out.split())
    assert {f"{SERVICE}/Respond", f"{SERVICE}/StreamRespond"} <= methods


async def test_buf_curl_calls_stream_respond_through_reflection(server: RunningServer) -> None:
    body = {
        "model": "echo",
        "messages": [{"role": "ROLE_USER", "content": "hello from buf curl"}],
        "deliveryMode": "DELIVERY_MODE_STREAM",
    }
    out = await _buf(
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "-d",
        json.dumps(body),
        f"http://{server.address}/{SERVICE}/StreamRespond",
    )
    decoder = json.JSONDecoder()
    events, index = [], 0
    while index < len(out):
        if out[index].isspace():
            index += 1
            continue
        event, index = decoder.raw_decode(out, index)
        events.append(event)
    text = "".join(e["chunk"].get("text", "") for e in events if "chunk" in e)
    completed = events[-1]["completed"]
    assert text == completed["finalText"] == "hello from buf curl"
    assert completed["verification"]["status"] == "VERIFICATION_STATUS_VERIFIED"
