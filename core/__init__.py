"""The neutral core both the API server and the workers use: job state machine, pipeline plan, queue, exports."""
