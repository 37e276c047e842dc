"""Calls a switchboard echo server with Python grpcio, using stubs generated
from proto/echo.proto, to prove the server is wire-compatible with clients
of the grpc-go example. Usage: echo_client.py <host:port>. Prints one line
per reply, prefixed with the RPC shape."""

import sys

import grpc

import echo_stubs


def main():
    target = sys.argv[1]
    pb, rpc = echo_stubs.load()
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
