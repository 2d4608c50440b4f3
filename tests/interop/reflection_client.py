"""A gRPC client that knows nothing of the gateway's .proto files.

It discovers m2m.gateway.v1.Gateway through server reflection (as grpcurl does),
builds the message classes from the descriptors it receives, and calls Validate
and grpc.health.v1.Health/Check. It also speaks reflection v1 (raw) to check the
newer service name answers.

usage: reflection_client.py HOST:PORT TOKEN
Prints one JSON object; exits non-zero on any failure.
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def call(channel, pool, service, method, body):
    svc = pool.FindServiceByName(service)
    m = svc.FindMethodByName(method)
    req_cls = message_factory.GetMessageClass(m.input_type)
    resp_cls = message_factory.GetMessageClass(m.output_type)
    stub = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=req_cls.SerializeToString,
        response_deserializer=resp_cls.FromString,
    )
    request = json_format.ParseDict(body, req_cls())
    return json_format.MessageToDict(stub(request, timeout=10), preserving_proto_field_name=True)


def list_services_v1(channel):
    # v1 and v1alpha share the wire format; only the service name differs.
    stream = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = stream(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return sorted(s.name for r in responses for s in r.list_services_response.service)


def main():
    target, token = sys.argv[1], sys.argv[2]
    with grpc.insecure_channel(target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        valid = call(channel, pool, "m2m.gateway.v1.Gateway", "Validate",
                     {"token": token, "required_scopes": ["orders/read"]})
        garbage = call(channel, pool, "m2m.gateway.v1.Gateway", "Validate", {"token": "a.b.c"})
        health = call(channel, pool, "grpc.health.v1.Health", "Check", {"service": ""})
        print(json.dumps({
            "services_v1alpha": services,
            "services_v1": list_services_v1(channel),
            "valid": valid,
            "garbage": garbage,
            "health": health,
        }))


if __name__ == "__main__":
    main()
