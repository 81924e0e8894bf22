"""Container health check: exit 0 when the local loraplex server answers SERVING.

Uses the standard grpc.health.v1 service (the same one Kubernetes' native gRPC
probes call), so it needs only grpcio + grpcio-health-checking, not torch.

    python healthcheck.py                  # 127.0.0.1:$LORAPLEX_PORT (default 50051)
    python healthcheck.py 10.0.0.5:50051 --service loraplex.v1.Generation

With TLS (LORAPLEX_TLS_CERT set) the server certificate is used as the trust root
and LORAPLEX_HEALTHCHECK_AUTHORITY (default: localhost) as the expected name.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 2.0) -> str:
    cert = os.environ.get("LORAPLEX_TLS_CERT", "")
    if cert:
        with open(cert, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        authority = os.environ.get("LORAPLEX_HEALTHCHECK_AUTHORITY", "localhost")
        channel = grpc.secure_channel(target, creds,
                                      options=[("grpc.ssl_target_name_override", authority)])
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="gRPC health check of a loraplex server")
    p.add_argument("target", nargs="?",
                   default=f"127.0.0.1:{os.environ.get('LORAPLEX_PORT') or 50051}")
    p.add_argument("--service", default="", help='"" = the whole server')
    p.add_argument("--timeout", type=float, default=2.0)
    a = p.parse_args(argv)
    try:
        status = check(a.target, a.service, a.timeout)
    except grpc.RpcError as err:
        print(f"{a.target}: {err.code().name} {err.details()}", file=sys.stderr)
        return 1
    print(f"{a.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
