"""qcow2 images (QEMU's docs/interop/qcow2.txt), encrypted with LUKS or legacy AES.

One module per job: :mod:`.header` (header, extensions, keys), :mod:`.tables` (L1/L2
lookup and cache), :mod:`.refcounts` (reference counts and cluster allocation),
:mod:`.compress` (compressed clusters), :mod:`.backing` (backing files),
:mod:`.volume` (the plaintext block device) and :mod:`.create` (new images).
"""

from nbdcrypt.formats.qcow2.create import create
from nbdcrypt.formats.qcow2.header import MAGIC, Qcow2Header, probe

__all__ = ["MAGIC", "Qcow2Header", "create", "probe"]
