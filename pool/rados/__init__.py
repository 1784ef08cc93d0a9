"""The pool layer on Ceph RADOS (issue 24; docs/INTERNALS.md, "RADOS backend").

The parts a Pool on RADOS is built from (DESIGN §8; ``Pool.create_rados``/``open_rados``
in pool/radosimporter.py compose them):

- ``binding``: finds librados' Python binding (Debian's python3-rados) without putting all
  of /usr/lib/python3/dist-packages on sys.path;
- ``conn``: one connection to a cluster, every librados call run in a worker thread, with
  op latency kept for metrics, and the fenced state of a blocklisted client;
- ``clslock``: the wire format of Ceph's ``lock`` object class (pure, no I/O);
- ``owner``: the pool's exclusive ownership lock with blocklist fencing (invariant 10);
- ``meta``: superblock, journal and checkpoint blobs as RADOS objects (invariants 2-4);
- ``segments``: segment column objects: write whole or append, ranged reads, delete;
- ``store``: ``RadosStore``, the SegmentStore on those objects;
- ``target``: where a pool lives (RADOS pool, ceph.conf, client id);
- ``backend``: ``RadosParts`` (what a Pool on RADOS holds), the metadata seam
  ``RadosCommitMeta`` (pool.metaseam) and the directory of pools in a RADOS pool.
"""
