"""The FUSE frontend: every volume a file, every snapshot a read-only one (``fs``), and the
mount's life inside the daemon's nursery (``mount``)."""
