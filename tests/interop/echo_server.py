"""A stock grpcio server of grpc.examples.echo.Echo, with grpcio's default
server options (keepalive enforcement included), for testing switchboard's
client against an independent server.

Usage: echo_server.py. Binds 127.0.0.1 on a free port, prints
`echo_server serving on 127.0.0.1:PORT` once it serves, and serves until
killed. UnaryEcho replies "<message> (from 127.0.0.1:PORT)"."""

from concurrent import futures

import grpc

import echo_stubs


def main():
    pb, rpc = echo_stubs.load()

    class Echo(rpc.EchoServicer):
        def __init__(self):
            self.address = None

        def UnaryEcho(self, request, context):
            return pb.EchoResponse(message=f"{request.message} (from {self.address})")

    echo = Echo()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    rpc.add_EchoServicer_to_server(echo, server)
    port = server.add_insecure_port("127.0.0.1:0")
    echo.address = f"127.0.0.1:{port}"
    server.start()
    print(f"echo_server serving on {echo.address}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
