"""Sends unary echoes through one grpcio channel with a load-balancing
policy, the way a grpcio user gives a fixed list of backends.

Usage: lb_client.py TARGET POLICY COUNT [AUTHORITY]

TARGET is any grpcio target, e.g. ipv4:127.0.0.1:50051,127.0.0.1:50052;
POLICY is pick_first or round_robin; AUTHORITY, if given, is set as the
grpc.default_authority channel option. Prints each reply, one a line; on
the first failed RPC prints `rpc failed: CODE DETAILS` and exits 1."""

import json
import sys

import grpc

import echo_stubs


def main():
    target, policy, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    options = [("grpc.service_config", json.dumps({"loadBalancingConfig": [{policy: {}}]}))]
    if len(sys.argv) > 4:
        options.append(("grpc.default_authority", sys.argv[4]))
    pb, rpc = echo_stubs.load()
    with grpc.insecure_channel(target, options=options) as channel:
        echo = rpc.EchoStub(channel)
        for i in range(count):
            try:
                reply = echo.UnaryEcho(pb.EchoRequest(message=f"py{i}"), timeout=10)
            except grpc.RpcError as error:
                print(f"rpc failed: {error.code()} {error.details()}", flush=True)
                sys.exit(1)
            print(reply.message, flush=True)


if __name__ == "__main__":
    main()
