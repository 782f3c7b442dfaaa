"""qcow2 images (QEMU's docs/interop/qcow2.txt), encrypted with LUKS or legacy AES.

One module per job: :mod:`.header` (header, extensions, keys), :mod:`.tables` (L1/L2
lookup and cache), :mod:`.refcounts` (reference counts and cluster allocation),
:mod:`.compress` (compressed clusters), :mod:`.backing` (backing files),
:mod:`.volume` (the plaintext block device), :mod:`.image` (a header that opens its
volume and backing chain) and :mod:`.create` (new images).
"""

from nbdcrypt.formats.qcow2.create import create
from nbdcrypt.formats.qcow2.header import MAGIC, Qcow2Header, probe
from nbdcrypt.formats.qcow2.image import Qcow2Image

__all__ = ["MAGIC", "Qcow2Header", "Qcow2Image", "create", "probe"]
