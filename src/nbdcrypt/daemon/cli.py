"""The ``nbdcrypt`` command line: serve, format, info, keyslot, repair, header, erase.

Every nbdcrypt error ends as one line on stderr and the error's exit status
(2 for bad input); nothing else prints a traceback at the user.
"""

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from .. import __version__
from ..crypto import native
from ..datapath.settings import SETTINGS
from ..errors import InputError, NbdcryptError
from ..formats.image import Passphrase
from ..formats.luks_common import create_file
from . import config, ctl, keys
from .headers import read_header

if TYPE_CHECKING:  # the formats are imported when a command needs them
    from ..formats.luks1 import Luks1Header
    from ..formats.luks2 import Luks2Header
    from ..formats.qcow2 import Qcow2Header

    NewHeader = Luks1Header | Luks2Header | Qcow2Header  # what `format` creates

SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
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


def add_image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="encrypted image (with --header: its data file)")
    parser.add_argument("--header", metavar="FILE", help="detached LUKS header file")


def add_pbkdf_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pbkdf", choices=["argon2id", "argon2i", "pbkdf2"],
                        help="keyslot PBKDF (default: argon2id for LUKS2; LUKS1 has only pbkdf2)")
    parser.add_argument("--iter-time", "-i", type=int, default=2000, metavar="MS",
                        help="milliseconds of PBKDF per unlock (default: %(default)s)")
    parser.add_argument("--pbkdf-memory", type=int, metavar="KB",
                        help="Argon2 memory (default: 1048576, at most half the RAM)")
    parser.add_argument("--pbkdf-parallel", type=int, metavar="N",
                        help="Argon2 threads (default: 4, at most the CPUs)")
    parser.add_argument("--pbkdf-force-iterations", type=int, metavar="N",
                        help="PBKDF iterations (Argon2: time cost), skipping the benchmark")


def kdf_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"pbkdf": args.pbkdf, "iter_time_ms": args.iter_time, "memory_kb": args.pbkdf_memory,
            "cpus": args.pbkdf_parallel, "iterations": args.pbkdf_force_iterations}


def add_key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-file", metavar="FILE",
                        help="read the passphrase from FILE (whole file, as cryptsetup --key-file)")
    parser.add_argument("--passphrase-fd", metavar="N", type=int,
                        help="read the passphrase (one line) from file descriptor N")


def build_parser() -> argparse.ArgumentParser:
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
    serve.add_argument("image", metavar="IMAGE", nargs="?", help="encrypted image file (or `image` in --config)")
    add_key_options(serve)
    serve.add_argument("--header", metavar="FILE", help="detached LUKS header file")
    serve.add_argument("--key-slot", "-S", type=int, metavar="N",
                       help="open only LUKS keyslot N, whatever its key derivation costs (default: "
                            "try keyslots within the budget of one unlock)")
    serve.add_argument("--backing-key-file", metavar="FILE", action="append",
                       help="read the passphrase of an encrypted qcow2 backing file from FILE (whole file); "
                            "repeat for each encrypted backing file, nearest first (the last one given "
                            "also opens deeper ones)")
    add_backing_dir_option(serve)
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH",
                       help="listen on this Unix socket (default: /run/nbdcrypt/IMAGE.sock, or "
                            "$XDG_RUNTIME_DIR/nbdcrypt/IMAGE.sock)")
    where.add_argument("--port", metavar="N", type=int, help="listen on TCP port N instead of a Unix socket")
    serve.add_argument("--bind", metavar="ADDR", help="address to listen on with --port (default: 127.0.0.1)")
    serve.add_argument("--readonly", action="store_true", help="export read-only; the image is never written")
    serve.add_argument("--insecure-legacy-aes", action="store_true",
                       help="serve a legacy AES qcow2 image read-write (it has no key check: a mistyped "
                            "passphrase writes under the wrong key)")
    add_queueing_options(serve)
    config.add_options(serve)
    serve.set_defaults(run=run_serve)

    fmt = commands.add_parser(
        "format", help="create a new encrypted image",
        description="Create IMAGE with a LUKS header and a payload of SIZE bytes (sparse), "
                    "compatible with cryptsetup (and, for LUKS1, qemu-img -f luks). With --header, "
                    "only the header FILE is created; IMAGE is the data file, used from --offset (default 0) "
                    "and never written (created sparse if SIZE is given and it does not exist).")
    fmt.add_argument("image", metavar="IMAGE", help="image file to create (with --header: the data file)")
    fmt.add_argument("size", metavar="SIZE", type=parse_size, nargs="?",
                     help="payload size: bytes or with K/M/G/T suffix (optional with --header)")
    fmt.add_argument("--type", choices=["luks1", "luks2", "qcow2"], default="luks2",
                     help="on-disk format (default: %(default)s, as cryptsetup)")
    add_key_options(fmt)
    fmt.add_argument("--header", metavar="FILE", help="create a detached header in FILE")
    fmt.add_argument("--offset", type=int, default=0, metavar="SECTORS",
                     help="LUKS payload start in IMAGE (with --header: in the data file), in 512-byte "
                          "sectors, a multiple of 8 (default: after the header; 0 with --header)")
    qcow2 = fmt.add_argument_group("qcow2 (--type qcow2; images qemu-img accepts)")
    qcow2.add_argument("--encrypt", choices=["luks", "aes"], default="luks",
                       help="qcow2 encryption (default: %(default)s)")
    qcow2.add_argument("--insecure-legacy-aes", action="store_true",
                       help="allow --encrypt aes (deprecated by QEMU, weak)")
    qcow2.add_argument("--cluster-size", type=parse_size, default=65536, metavar="N",
                       help="cluster size, 512 to 2M (default: 64K)")
    qcow2.add_argument("--compat", choices=["0.10", "1.1"], default="1.1",
                       help="qcow2 version: 0.10 is v2, 1.1 is v3 (default: %(default)s)")
    qcow2.add_argument("--backing", metavar="FILE", help="backing file, relative to the image's directory")
    qcow2.add_argument("--backing-format", choices=["raw", "qcow2"],
                       help="the backing file's format (required with --backing; never probed)")
    add_backing_dir_option(qcow2)
    fmt.add_argument("--cipher", default="aes-xts-plain64", metavar="SPEC",
                     help="cipher in dm-crypt form (default: %(default)s)")
    fmt.add_argument("--key-size", type=int, default=None, metavar="BITS",
                     help="master key size in bits; xts counts both halves (default: 512 for xts, "
                          "else 256, as cryptsetup)")
    fmt.add_argument("--hash", default="sha256", metavar="H",
                     help="hash for PBKDF2, the AF splitter and the digest (default: %(default)s)")
    fmt.add_argument("--sector-size", type=int, default=None, metavar="N",
                     help="LUKS2 encryption sector size, 512-4096 (default: 4096 when SIZE allows, "
                          "else 512, as cryptsetup for files)")
    fmt.add_argument("--label", default="", help="LUKS2 label")
    fmt.add_argument("--subsystem", default="", help="LUKS2 subsystem")
    add_pbkdf_options(fmt)
    fmt.set_defaults(run=run_format)

    keyslot = commands.add_parser(
        "keyslot", help="add, remove or change a passphrase",
        description="Change IMAGE's keyslots, crash-safely: a crash at any point leaves an image "
                    "that opens with the old or the new passphrase.")
    actions = keyslot.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("add", "add a passphrase (needs an existing one)"),
                         ("remove", "remove the keyslot the passphrase opens, or --key-slot N"),
                         ("change", "replace the passphrase of a keyslot")):
        sub = actions.add_parser(action, help=text, description=text)
        add_image_options(sub)
        add_key_options(sub)
        sub.add_argument("--key-slot", "-S", type=int, metavar="N",
                         help="keyslot to fill (add), remove (remove) or open (change)")
        if action != "remove":
            sub.add_argument("--new-key-file", metavar="FILE", help="read the new passphrase from FILE")
            add_pbkdf_options(sub)
        sub.set_defaults(run=run_keyslot)

    repair = commands.add_parser(
        "repair", help="rewrite a damaged or stale LUKS2 header copy from the good one",
        description="If one LUKS2 header copy is damaged or older than the other, rewrite both "
                    "from the newest valid copy. Nothing is written when both are fine.")
    add_image_options(repair)
    repair.set_defaults(run=run_repair)

    header = commands.add_parser(
        "header", help="back up or restore a LUKS header and its keyslots (as cryptsetup)",
        description="Back up or restore IMAGE's LUKS header and keyslot areas, in the file format "
                    "of cryptsetup luksHeaderBackup: each tool restores the other's backups.")
    actions = header.add_subparsers(dest="action", required=True, metavar="ACTION")
    backup = actions.add_parser(
        "backup", help="write the header and keyslot areas to a new FILE",
        description="Write IMAGE's LUKS header and keyslot areas to FILE, created with mode 0600 "
                    "(an existing FILE is never overwritten). The backup holds the keyslots: whoever "
                    "has it and a passphrase it knew can open the volume, even after the passphrase "
                    "was changed on the image.")
    restore = actions.add_parser(
        "restore", help="write a header backup back onto IMAGE",
        description="Replace IMAGE's LUKS header and keyslots with those in FILE (made by `nbdcrypt "
                    "header backup` or cryptsetup luksHeaderBackup). Refused for a served image, a "
                    "backup whose data offset or header size differs from the image's, and, unless "
                    "--force, a backup of another volume (UUID) or an image without a readable LUKS header.")
    for sub in (backup, restore):
        add_image_options(sub)
        sub.add_argument("file", metavar="FILE", help="the header backup file")
        sub.set_defaults(run=run_header)
    restore.add_argument("--force", action="store_true",
                         help="restore a backup of another volume, or onto an image whose header is unreadable")

    erase = commands.add_parser(
        "erase", help="destroy every keyslot: no passphrase opens the image any more",
        description="Remove every keyslot of IMAGE and overwrite the keyslot areas with random bytes, "
                    "as cryptsetup luksErase; only a header backup can open the volume afterwards. "
                    "Asks for confirmation on a terminal; refused for a served image.")
    add_image_options(erase)
    erase.add_argument("--batch-mode", "-q", action="store_true", help="do not ask for confirmation")
    erase.set_defaults(run=run_erase)

    info = commands.add_parser("info", help="show an image's header (no secrets)",
                               description="Print format, cipher, key size, sector size, payload "
                                           "geometry and keyslots of IMAGE. Needs no passphrase.")
    add_image_options(info)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    add_backing_dir_option(info)
    info.set_defaults(run=run_info)

    ctl.add_parser(commands)
    return parser


def add_backing_dir_option(parser: argparse._ActionsContainer) -> None:
    parser.add_argument("--backing-dir", metavar="DIR", action="append",
                        help="let a qcow2 backing file name lead into DIR (repeatable); without it only "
                             "relative names without .. that stay in the image's directory are followed")


def add_queueing_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "queueing layer (dm-crypt's flags; all off = crypto on worker threads, sorted writer)")
    for setting in SETTINGS:
        ctl.add_setting_option(group, setting)
    group.add_argument("--control", metavar="PATH",
                       help="control socket for `nbdcrypt ctl` (statistics, live changes)")
    group.add_argument("--metrics", metavar="PATH|PORT",
                       help="serve Prometheus metrics (HTTP GET /metrics) on a Unix socket PATH, "
                            "on 127.0.0.1:PORT, or on HOST:PORT")


def run_serve(args: argparse.Namespace) -> int:
    from .serve import main

    return main(args)


def run_format(args: argparse.Namespace) -> int:
    from ..formats.luks1 import format_luks1
    from ..formats.luks2 import format_luks2

    size = data_size(args)
    key_bits = args.key_size or (512 if "-xts-" in args.cipher else 256)
    common = dict(cipher=args.cipher, key_bits=key_bits, hash_name=args.hash, iter_time_ms=args.iter_time,
                  detached=args.header is not None, offset_sectors=args.offset)
    if args.type == "qcow2":
        from ..formats.qcow2 import create

        if args.header or args.offset:
            raise InputError("qcow2 keeps its encryption header inside the image: no --header or --offset")
        if args.encrypt == "aes" and args.insecure_legacy_aes:
            from ..formats.qcow2.create import AES_WARNING
            print(f"nbdcrypt: warning: {AES_WARNING}", file=sys.stderr)

        def make(path: str, passphrase: Passphrase) -> "NewHeader":
            return create(
                path, size, passphrase, encrypt=args.encrypt, cluster_size=args.cluster_size, compat=args.compat,
                backing=args.backing, backing_format=args.backing_format, backing_dirs=args.backing_dir or (),
                cipher=args.cipher, key_bits=key_bits, hash_name=args.hash, iter_time_ms=args.iter_time,
                allow_aes=args.insecure_legacy_aes)
    elif args.type == "luks1":
        if args.pbkdf not in (None, "pbkdf2") or args.sector_size not in (None, 512) or args.label \
                or args.subsystem:
            raise InputError("LUKS1 has only pbkdf2, 512-byte sectors and no label or subsystem")

        def make(path: str, passphrase: Passphrase) -> "NewHeader":
            return format_luks1(path, size, passphrase, iterations=args.pbkdf_force_iterations, **common)
    else:
        sector_size = args.sector_size or (4096 if size % 4096 == 0 else 512)

        def make(path: str, passphrase: Passphrase) -> "NewHeader":
            return format_luks2(
                path, size, passphrase, sector_size=sector_size, pbkdf=args.pbkdf or "argon2id",
                pbkdf_memory=args.pbkdf_memory, pbkdf_parallel=args.pbkdf_parallel,
                pbkdf_iterations=args.pbkdf_force_iterations, label=args.label, subsystem=args.subsystem,
                **common)
    target = args.header or args.image
    if os.path.exists(target):
        raise InputError(f"{target}: already exists")
    passphrase = keys.read_passphrase(args.key_file, args.passphrase_fd, prompt="Enter new passphrase: ")
    try:
        header = make(target, passphrase)
    finally:
        keys.wipe(passphrase)
    if args.header and not os.path.exists(args.image):
        create_file(args.image, args.offset * 512 + size, [])
    print(f"{target}: {header.info()['format']} {header.cipher_spec}, payload {size} bytes")
    return 0


def data_size(args: argparse.Namespace) -> int:
    """SIZE, or with --header the existing data file's size from --offset; checked
    before any write."""
    if args.header is None:
        if args.size is None:
            raise InputError("SIZE is required (except with --header and an existing data file)")
        return args.size
    if not os.path.exists(args.image):
        if args.size is None:
            raise InputError(f"{args.image}: no such data file; give SIZE to create it")
        return args.size
    if args.size is not None:
        raise InputError(f"{args.image}: data file exists; omit SIZE to use all of it")
    data_bytes, offset_bytes = os.path.getsize(args.image), args.offset * 512
    if data_bytes < offset_bytes:
        raise InputError(f"{args.image}: data file ({data_bytes} bytes) ends before --offset "
                         f"{args.offset} ({offset_bytes} bytes)")
    return data_bytes - offset_bytes


def run_keyslot(args: argparse.Namespace) -> int:
    from ..formats import luks_common

    operations: dict[str, Callable[..., tuple[Any, int]]] = {
        "add": luks_common.add_passphrase, "change": luks_common.change_passphrase,
        "remove": luks_common.remove_passphrase}
    operation = operations[args.action]
    path = args.header or args.image
    secrets, options = [], {}
    with open_image(path, "r+b") as f:
        header = read_header(f, path)
        try:
            secrets.append(keys.read_passphrase(args.key_file, args.passphrase_fd,
                                                prompt=f"Enter passphrase for {args.image}: "))
            if args.action != "remove":
                secrets.append(keys.read_passphrase(args.new_key_file, None, prompt="Enter new passphrase: "))
                options = kdf_options(args)
            _, slot = operation(f, header, *secrets, args.key_slot, **options)
        finally:
            for secret in secrets:
                keys.wipe(secret)
    print(f"{path}: keyslot {slot} {ACTION_DONE[args.action]}")
    return 0


ACTION_DONE = {"add": "added", "remove": "removed", "change": "now holds the new passphrase"}


def run_repair(args: argparse.Namespace) -> int:
    from ..formats.luks_common import commit

    path = args.header or args.image
    with open_image(path, "r+b") as f:
        header = read_header(f, path)
        if not header.warnings:
            print(f"{path}: nothing to repair")
            return 0
        commit(f, header.repaired())  # type: ignore[attr-defined]  # only LUKS2 headers have warnings
    print(f"{path}: both header copies rewritten")
    return 0


def run_header(args: argparse.Namespace) -> int:
    from ..formats import luks_backup
    from ..formats.luks_common import commit

    path = args.header or args.image
    if args.action == "backup":
        with open_image(path) as f:
            data = luks_backup.backup(f, read_header(f, path))
        create_file(args.file, len(data), [(0, data)])
        print(f"{path}: header backed up to {args.file} ({len(data)} bytes)")
        return 0
    with open_image(args.file) as source, open_for_change(args) as target:
        commit(target, luks_backup.restore_writes(source, read_header(source, args.file), target, path,
                                                  args.force))
    print(f"{path}: header restored from {args.file}")
    return 0


def run_erase(args: argparse.Namespace) -> int:
    from ..formats.luks_backup import require_luks
    from ..formats.luks_common import commit

    path = args.header or args.image
    with open_for_change(args) as f:
        header = require_luks(read_header(f, path), "erase")
        if not args.batch_mode:
            confirm(f"This operation will erase all keyslots on {path}.\n"
                    f"The volume will become unusable after this operation.", "keyslots were NOT wiped")
        commit(f, header.erased()[1])
    print(f"{path}: every keyslot erased")
    return 0


def confirm(warning: str, refused: str) -> None:
    """Ask on the terminal as cryptsetup does; InputError unless the answer is YES.
    Without a terminal nothing can be asked: the caller must pass --batch-mode."""
    if not sys.stdin.isatty():
        raise InputError(f"no terminal to confirm on: pass --batch-mode (-q) to go ahead; {refused}")
    print(f"\nWARNING!\n========\n{warning}\n\nAre you sure? (Type 'yes' in capital letters): ", end="", flush=True)
    if sys.stdin.readline() != "YES\n":
        raise InputError(f"operation aborted, {refused}")


@contextlib.contextmanager
def open_for_change(args: argparse.Namespace) -> Iterator[BinaryIO]:
    """The header file open for writing, with IMAGE locked as serve locks it, so a served
    image (or one QEMU writes) is refused before anything is read or written."""
    from ..storage.locking import lock_image

    with open_image(args.image, "r+b") as image:
        lock_image(image.fileno(), args.image, readonly=False)
        if args.header is None:
            yield image
        else:
            with open_image(args.header, "r+b") as header:
                yield header


@contextlib.contextmanager
def open_image(path: str, mode: Literal["rb", "r+b"] = "rb") -> Iterator[BinaryIO]:
    try:
        with open(path, mode) as f:
            yield f
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None


def run_info(args: argparse.Namespace) -> int:
    from ..formats.qcow2.backing import backing_path

    path = args.header or args.image
    with open_image(path) as f:
        header = read_header(f, path)
    if header.backing_file:  # a name serve would refuse is refused here too
        backing_path(path, header.backing_file, args.backing_dir or ())
    info = header.info()
    if header.cipher_spec:
        info["engine"] = native.engine_for(header.cipher_spec)  # the sector cipher's: native or numpy
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def format_info(info: dict[str, Any], indent: str = "") -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, list):
            lines.append(f"{indent}{key}:")
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    lines.append(f"{indent}  {i}:")
                    lines.append(format_info(item, indent + "    "))
                else:
                    lines.append(f"{indent}  - {item}")
        elif isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(format_info(value, indent + "  "))
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
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
