"""The agent: runs deployments of model versions on one machine and reports its metrics and their states."""
