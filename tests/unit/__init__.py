"""Unit tests: in-process, on real files or bytes alone; no daemon, no external client."""
