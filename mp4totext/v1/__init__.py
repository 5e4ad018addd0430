"""Generated gRPC stubs for mp4totext.v1 (see scripts/gen_protos.py)."""
