"""A stock grpcio client on xds:///SERVICE for `switchboard demo --scenario
policy`: unary echoes at RATE per second, one line a second with that
second's `ok=N failed=M`. No generated code: the echo messages are one
string field each, encoded here, so grpcio alone is needed.

Usage: grpcio_client.py TARGET RATE  (GRPC_XDS_BOOTSTRAP names the bootstrap)"""

import signal
import sys
import threading
import time

import grpc


def encode(message):
    data = message.encode()
    size, length = len(data), bytearray()
    while True:
        byte = size & 0x7F
        size >>= 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            return b"\x0a" + bytes(length) + data


def main():
    target, rate = sys.argv[1], float(sys.argv[2])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=30)
    echo = channel.unary_unary(
        "/grpc.examples.echo.Echo/UnaryEcho",
        request_serializer=lambda m: m,
        response_deserializer=lambda b: b,
    )
    print("grpcio ready", flush=True)
    lock = threading.Lock()
    counts = {"ok": 0, "failed": 0}

    def done(future):
        key = "failed" if future.exception() else "ok"
        with lock:
            counts[key] += 1

    request = encode("demo")
    started = time.monotonic()
    next_report = started + 1.0
    sent = 0
    while not stop.is_set():
        now = time.monotonic()
        due = int((now - started) * rate)
        while sent < due:
            echo.future(request, timeout=1.0).add_done_callback(done)
            sent += 1
        if now >= next_report:
            with lock:
                line = f"t={int(now - started):>3}s ok={counts['ok']} failed={counts['failed']}"
                counts["ok"] = counts["failed"] = 0
            print(line, flush=True)
            next_report += 1.0
        stop.wait(0.002)
    channel.close()


if __name__ == "__main__":
    main()
