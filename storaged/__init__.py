"""storaged: the daemon, its config, control API, admin CLI and metrics."""
