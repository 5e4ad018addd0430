"""Pure pipeline stages: files and arrays in, results out. No gRPC, no Dramatiq, no DB."""
