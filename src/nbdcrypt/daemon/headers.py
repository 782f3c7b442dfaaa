"""Opening a header for a command: the format's reader, with its warnings shown."""

import sys

from ..formats import open_header
from ..formats.image import Image, ImageFile


def read_header(f: ImageFile, path: str) -> Image:
    """The header; its warnings (LUKS2: a damaged or stale copy) printed as one line each."""
    header = open_header(f, path)
    for warning in header.warnings:
        print(f"nbdcrypt: warning: {warning}", file=sys.stderr)
    return header
