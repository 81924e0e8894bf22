#!/usr/bin/env bash
# Regenerates the Python stubs of protos/loraplex/v1/loraplex.proto into
# loraplex_client/_proto/ (committed, so installing the client needs no protoc).
# Usage: clients/python/generate_protos.sh   (from anywhere; needs grpcio-tools)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$here/loraplex_client/_proto"
python="${PYTHON:-python3}"

rm -rf "$out/loraplex"
mkdir -p "$out/loraplex/v1"
"$python" -m grpc_tools.protoc \
  -I "$repo/protos" \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  "$repo/protos/loraplex/v1/loraplex.proto"

# protoc writes absolute imports ("from loraplex.v1 import ..."), which would
# resolve to the server package; point them at this package instead.
sed -i -E 's/^from loraplex\.v1 import /from loraplex_client._proto.loraplex.v1 import /' \
  "$out/loraplex/v1/"*.py "$out/loraplex/v1/"*.pyi
for d in "$out" "$out/loraplex" "$out/loraplex/v1"; do
  [ -f "$d/__init__.py" ] || echo '"""Generated protobuf stubs (clients/python/generate_protos.sh)."""' > "$d/__init__.py"
done
echo "stubs written to $out/loraplex/v1"
