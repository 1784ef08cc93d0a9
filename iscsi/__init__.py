"""The iSCSI target: a pure protocol core (``pdu``, ``login``, ``session``, ``scsi``) and a
short trio transport (``server``); ``targets`` maps target names to volumes."""
