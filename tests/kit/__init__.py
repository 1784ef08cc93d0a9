"""Helpers shared by the tests: pools, daemons, NBD/iSCSI harnesses, the crash simulator."""
