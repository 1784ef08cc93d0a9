"""Property tests: hypothesis state machines and seeded model checkers against a model."""
