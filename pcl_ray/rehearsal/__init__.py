"""The cluster rehearsal: the cloud layout of pcl-ray on one machine.

A head and two worker "hosts", each a network namespace on a private subnet (a bridge in a separate
switch namespace joins them; the machine's own namespace gets no address there) and a mount namespace
with its own ``/tmp`` and ``/var/tmp/pcl-node``, so that no node sees another's local disk. The head
also runs an S3 API server (moto) and an MLflow tracking server whose artifacts go to that bucket.
Jobs go through ``ray job submit`` as they would on a cloud cluster; fault scenarios kill whole nodes.

- :mod:`.netns`: namespaces, bridge, veth pairs, processes started inside a node, teardown.
- :mod:`.services`: the object store, the bucket, the tracking server, readiness waits.
- :mod:`.cluster`: the Ray head and workers, node kills, job submission, the listening-socket audit.
- :mod:`.probe`: small checks run *inside* the head's namespace (the bucket, the tracking server).
- :mod:`.scenarios`: what the rehearsal runs and what each scenario expects.
- ``python -m pcl_ray.rehearsal [--short] [--keep]``: bring it up, run the scenarios, report, tear down.

Needs root and ``ip netns`` (iproute2); :func:`.netns.unavailable_reason` says why not otherwise.
"""

from .netns import unavailable_reason

__all__ = ["unavailable_reason"]
