"""The ``nbdcrypt`` command line: serve, format, info.

Every nbdcrypt error ends as one line on stderr and the error's exit status
(2 for bad input); nothing else prints a traceback at the user.
"""

import argparse
import json
import os
import sys

from .. import __version__
from ..errors import InputError, NbdcryptError
from . import keys

SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text):
    """``512``, ``64K``, ``10M``, ``1G``, ``2T`` (binary units, like qemu-img) -> bytes."""
    number, suffix = text.rstrip("iBb").upper(), ""
    if number and number[-1] in SIZE_SUFFIXES:
        number, suffix = number[:-1], number[-1]
    try:
        size = int(number) * SIZE_SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 512, 64K, 10M, 1G)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, not {text!r}")
    return size


def add_key_options(parser):
    parser.add_argument("--key-file", metavar="FILE",
                        help="read the passphrase from FILE (whole file, as cryptsetup --key-file)")
    parser.add_argument("--passphrase-fd", metavar="N", type=int,
                        help="read the passphrase (one line) from file descriptor N")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="nbdcrypt",
        description="Serve LUKS-encrypted images as plaintext NBD block devices.",
        epilog="Passphrases come from --key-file, --passphrase-fd, piped stdin or a prompt; never argv.")
    parser.add_argument("--version", action="version", version=f"nbdcrypt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="serve a decrypted image over NBD until SIGTERM/SIGINT",
        description="Unlock IMAGE once and serve its plaintext over NBD with nbdkit. Runs in the "
                    "foreground until SIGTERM or SIGINT; prints the NBD URI once clients can connect.")
    serve.add_argument("image", metavar="IMAGE", help="encrypted image file")
    add_key_options(serve)
    serve.add_argument("--header", metavar="FILE", help="detached LUKS header file")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH",
                       help="listen on this Unix socket (default: /run/nbdcrypt/IMAGE.sock, or "
                            "$XDG_RUNTIME_DIR/nbdcrypt/IMAGE.sock)")
    where.add_argument("--port", metavar="N", type=int, help="listen on TCP port N instead of a Unix socket")
    serve.add_argument("--bind", metavar="ADDR", default="127.0.0.1",
                       help="address to listen on with --port (default: %(default)s)")
    serve.add_argument("--readonly", action="store_true", help="export read-only; the image is never written")
    serve.set_defaults(run=run_serve)

    fmt = commands.add_parser(
        "format", help="create a new encrypted image",
        description="Create IMAGE with a LUKS header and a payload of SIZE bytes (sparse), "
                    "compatible with cryptsetup and qemu-img -f luks.")
    fmt.add_argument("image", metavar="IMAGE", help="image file to create")
    fmt.add_argument("size", metavar="SIZE", type=parse_size, help="payload size: bytes or with K/M/G/T suffix")
    fmt.add_argument("--type", choices=["luks1"], default="luks1", help="on-disk format (default: %(default)s)")
    add_key_options(fmt)
    fmt.add_argument("--cipher", default="aes-xts-plain64", metavar="SPEC",
                     help="cipher in dm-crypt form (default: %(default)s)")
    fmt.add_argument("--key-size", type=int, default=None, metavar="BITS",
                     help="master key size in bits; xts counts both halves (default: 256, as cryptsetup)")
    fmt.add_argument("--hash", default="sha256", metavar="H", help="PBKDF2 hash (default: %(default)s)")
    fmt.add_argument("--iter-time", type=int, default=2000, metavar="MS",
                     help="milliseconds of PBKDF2 per unlock (default: %(default)s)")
    fmt.add_argument("--force", action="store_true", help="overwrite an existing non-empty IMAGE")
    fmt.set_defaults(run=run_format)

    info = commands.add_parser("info", help="show an image's header (no secrets)",
                               description="Print format, cipher, key size, sector size, payload "
                                           "geometry and keyslots of IMAGE. Needs no passphrase.")
    info.add_argument("image", metavar="IMAGE")
    info.add_argument("--header", metavar="FILE", help="detached LUKS header file")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=run_info)
    return parser


def run_serve(args):
    from .serve import serve

    passphrase = keys.read_passphrase(args.key_file, args.passphrase_fd,
                                      prompt=f"Enter passphrase for {args.image}: ")
    return serve(args.image, passphrase, header=args.header, socket_path=args.socket, port=args.port,
                 bind=args.bind, readonly=args.readonly)


def run_format(args):
    from ..formats.luks1 import format_luks1

    if os.path.exists(args.image) and os.path.getsize(args.image) > 0 and not args.force:
        raise InputError(f"{args.image}: exists and is not empty; pass --force to overwrite it")
    passphrase = keys.read_passphrase(args.key_file, args.passphrase_fd, prompt="Enter new passphrase: ")
    header = format_luks1(args.image, args.size, passphrase, cipher=args.cipher,
                          key_bits=args.key_size or 256, hash_name=args.hash, iter_time_ms=args.iter_time)
    print(f"{args.image}: {header.info()['format']} {header.cipher_spec}, payload {args.size} bytes")
    return 0


def run_info(args):
    from ..formats import open_header

    path = args.header or args.image
    try:
        with open(path, "rb") as f:
            info = open_header(f, path).info()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def format_info(info, indent=""):
    lines = []
    for key, value in info.items():
        if isinstance(value, list):
            lines.append(f"{indent}{key}:")
            for i, item in enumerate(value):
                lines.append(f"{indent}  {i}:")
                lines.append(format_info(item, indent + "    "))
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except NbdcryptError as e:
        print(f"nbdcrypt: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
