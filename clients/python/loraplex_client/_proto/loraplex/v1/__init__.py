"""Generated protobuf stubs (clients/python/generate_protos.sh)."""
