"""A stock grpcio client following the registry over xDS: unary echoes to
xds:///SERVICE from several threads until SIGTERM.

Usage: xds_client.py TARGET WORKERS PACE_MS

GRPC_XDS_BOOTSTRAP names the bootstrap file (the test writes it). Waits
for the channel to be ready, prints `started`, then one line per RPC:
`ok SENT DONE MESSAGE` or `fail SENT DONE CODE DETAILS`, times in
milliseconds of CLOCK_MONOTONIC (the test compares them with its own).
On SIGTERM the workers finish their RPC in flight and it prints `stopped`."""

import os
import signal
import sys
import threading
import time

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "interop"))
import echo_stubs  # noqa: E402


def now_ms():
    return time.clock_gettime(time.CLOCK_MONOTONIC) * 1000.0


def main():
    target, workers, pace = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) / 1000.0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pb, rpc = echo_stubs.load()
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=30)
    echo = rpc.EchoStub(channel)
    lock = threading.Lock()

    def work():
        while not stop.is_set():
            sent = now_ms()
            try:
                reply = echo.UnaryEcho(pb.EchoRequest(message="xds"), timeout=5)
                line = f"ok {sent:.3f} {now_ms():.3f} {reply.message}"
            except grpc.RpcError as error:
                line = f"fail {sent:.3f} {now_ms():.3f} {error.code().name} {error.details()}"
            with lock:
                print(line, flush=True)
            stop.wait(pace)

    print("started", flush=True)
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    # A bounded wait lets the main thread run the SIGTERM handler.
    while not stop.wait(0.2):
        pass
    for thread in threads:
        thread.join()
    channel.close()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
