"""Tests that run an external tool (promtool, Docker Compose) but need no server: `make test`
runs them, `make check` does not."""
