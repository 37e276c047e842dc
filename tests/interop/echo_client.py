"""Calls a switchboard echo server with Python grpcio, using stubs generated
from proto/echo.proto, to prove the server is wire-compatible with clients
of the grpc-go example. Usage: echo_client.py <host:port>. Prints one line
per reply, prefixed with the RPC shape."""

import importlib
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc


def stubs(proto_dir):
    out = tempfile.mkdtemp()
    status = protoc.main(
        ["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}", "echo.proto"]
    )
    if status != 0:
        sys.exit(f"protoc failed with {status}")
    sys.path.insert(0, out)
    return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")


def main():
    target = sys.argv[1]
    proto_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")
    pb, rpc = stubs(proto_dir)
    with grpc.insecure_channel(target) as channel:
        echo = rpc.EchoStub(channel)
        print("unary:", echo.UnaryEcho(pb.EchoRequest(message="py"), timeout=10).message)
        for reply in echo.ServerStreamingEcho(
            pb.EchoRequest(message="py"), timeout=10, metadata=(("x-echo-count", "3"),)
        ):
            print("server-streaming:", reply.message)
        requests = iter([pb.EchoRequest(message=m) for m in ("a", "b", "c")])
        print("client-streaming:", echo.ClientStreamingEcho(requests, timeout=10).message)
        requests = iter([pb.EchoRequest(message=m) for m in ("x", "y")])
        for reply in echo.BidirectionalStreamingEcho(requests, timeout=10):
            print("bidi:", reply.message)


if __name__ == "__main__":
    main()
