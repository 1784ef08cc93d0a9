"""The iSCSI target: a pure protocol core (``pdu``, ``login``, ``session``, ``cdb``,
``reservations``), the SCSI executor that awaits the Volume (``scsi``), a short trio
transport (``server``); ``targets`` maps target names to volumes."""
