"""mvm's REST API (FastAPI): what the CLI does, for other programs, served by the agent
(`server.serve`) on a root-only Unix socket or on TCP with a bearer token."""
