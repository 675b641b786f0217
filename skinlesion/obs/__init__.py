"""Optional observability integrations, each off unless its environment variable is set."""
