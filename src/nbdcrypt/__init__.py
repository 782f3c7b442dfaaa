"""nbdcrypt: a userspace encrypted block device served over NBD.

Rooms, each with one job:

* :mod:`nbdcrypt.crypto`  -- sector ciphers, KDFs, the anti-forensic splitter.
* :mod:`nbdcrypt.formats` -- on-disk formats (LUKS1, ...): headers, keyslots, payload geometry.
* :mod:`nbdcrypt.plugin`  -- the data path: backing store, encrypted volume, nbdkit glue.
* :mod:`nbdcrypt.daemon`  -- the control plane: CLI and the nbdkit supervisor.

The data path never imports the control plane.
"""

__version__ = "0.1.0"
