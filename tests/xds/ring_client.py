"""A stock grpcio client sending keyed calls over xDS, round after round,
until SIGTERM: where each key lands, for the ring_hash tests.

Usage: ring_client.py TARGET HEADER KEYS REPEATS

GRPC_XDS_BOOTSTRAP names the bootstrap file (the test writes it). Prints
`started`, then one line per round: `round SENT DONE R0 R1 ...`, times in
milliseconds of CLOCK_MONOTONIC (the test compares them with its own),
and Ri what the calls of key `key-i` got: the backend's address, several
joined with `|` if its REPEATS calls did not all reach the same one, or
`!CODE` for a failed call. A round sends every key once, all keys at a
time, then again, REPEATS times, so a key's calls are spread over the
round. On SIGTERM it finishes the round and prints `stopped`."""

import faulthandler
import os
import signal
import sys
import time

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "interop"))
import echo_stubs  # noqa: E402


def now_ms():
    return time.clock_gettime(time.CLOCK_MONOTONIC) * 1000.0


def backend_of(message):
    # Echo replies "<message> (from <addr>)".
    return message.rsplit("(from ", 1)[-1].rstrip(")")


def main():
    # A crash inside grpc's core would otherwise end the output silently.
    faulthandler.enable()
    target, header = sys.argv[1], sys.argv[2]
    keys, repeats = int(sys.argv[3]), int(sys.argv[4])
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    pb, rpc = echo_stubs.load()
    # Not waiting for the channel to be ready: ring_hash stays IDLE until
    # a call lands on an endpoint, and calls queue until it connects.
    channel = grpc.insecure_channel(target)
    echo = rpc.EchoStub(channel)
    print("started", flush=True)
    while not stopping:
        sent = now_ms()
        got = [[] for _ in range(keys)]
        for _ in range(repeats):
            calls = [
                echo.UnaryEcho.future(
                    pb.EchoRequest(message="ring"),
                    metadata=((header, f"key-{i}"),),
                    timeout=10,
                )
                for i in range(keys)
            ]
            for i, call in enumerate(calls):
                try:
                    result = backend_of(call.result().message)
                except grpc.RpcError as error:
                    result = f"!{error.code().name}"
                if result not in got[i]:
                    got[i].append(result)
        results = " ".join("|".join(g) for g in got)
        print(f"round {sent:.3f} {now_ms():.3f} {results}", flush=True)
    channel.close()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
