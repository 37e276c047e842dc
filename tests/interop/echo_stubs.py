"""Generates the Python stubs of proto/echo.proto (grpc.examples.echo.Echo)
into a temporary directory and imports them, so no generated file is kept in
the repository."""

import importlib
import os
import sys
import tempfile

from grpc_tools import protoc

PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")


def load():
    """Returns the (echo_pb2, echo_pb2_grpc) modules."""
    out = tempfile.mkdtemp()
    status = protoc.main(
        ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--grpc_python_out={out}", "echo.proto"]
    )
    if status != 0:
        sys.exit(f"protoc failed with {status}")
    sys.path.insert(0, out)
    return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")
