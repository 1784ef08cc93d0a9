"""Integration tests: the real daemon, real sockets and real clients."""
