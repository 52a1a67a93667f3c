"""What the CLI (and later the agent and the REST API) call: tenants, pools, scale, instances, host set-up."""
