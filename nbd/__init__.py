"""The NBD frontend: a sans-I/O protocol core (``proto``), the trio transport that runs it
against the Volume API (``server``), the export catalog (``exports``: ``POOL/VOLUME`` and
read-only ``POOL/VOLUME@SNAPSHOT``) and the payload memory budget (``limits``)."""
