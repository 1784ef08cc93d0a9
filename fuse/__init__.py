"""FUSE frontend (every volume as a file); arrives with the FUSE issue."""
