"""NBD frontend: a sans-I/O protocol core and a trio transport; arrives with the NBD issue."""
