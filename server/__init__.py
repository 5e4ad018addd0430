"""gRPC server: thin servicers over the database, object store and job queue."""
