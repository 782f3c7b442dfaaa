#!/usr/bin/env python3
"""Regenerate luks1_vectors.json: known answers for the sector-cipher engine from
QEMU (which encrypts) and cryptsetup (which reveals the master key).

For each cipher configuration: create a sparse 3 TiB LUKS1 image with qemu-img,
write known plaintext through qemu-io at a few sectors (one pair straddling
sector 2^32, to pin the 32-bit wrap of "plain"), dump the master key and payload
offset with cryptsetup, and read the ciphertext straight from the image file.

Usage: make_luks_vectors.py [OUTPUT]   (needs qemu-img, qemu-io, cryptsetup)
"""

import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SECTOR = 512
SECTORS = (0, 12345, (1 << 32) - 1)  # each vector covers this sector and the next
CONFIGS = [  # qemu-img -o options: cipher-alg, cipher-mode, ivgen-alg[, ivgen-hash-alg]
    ("aes-256", "xts", "plain64"),
    ("aes-128", "xts", "plain64"),
    ("aes-256", "xts", "plain"),
    ("aes-256", "xts", "essiv", "sha256"),
    ("aes-256", "cbc", "essiv", "sha256"),
    ("aes-128", "cbc", "essiv", "sha256"),
    ("aes-256", "cbc", "plain64"),
    ("aes-128", "cbc", "plain64"),
    ("aes-256", "cbc", "plain"),
    ("aes-128", "cbc", "plain"),
    ("aes-256", "ctr", "plain64"),
]
# No ECB: QEMU writes the mode "ecb-plain64", which cryptsetup cannot open, and
# cannot open cryptsetup's "ecb".


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def luks_dump(image, keyfile):
    """(cipher name, cipher mode, payload offset in bytes, master key) from cryptsetup."""
    dump = run("cryptsetup", "luksDump", "--dump-master-key", "--batch-mode",
               "--key-file", str(keyfile), str(image))

    def field(name):
        return re.search(rf"^{name}:\s*(.*)$", dump, re.M).group(1).strip()

    key_hex = re.search(r"^MK dump:\s*((?:[0-9a-f]{2}\s*)+)", dump, re.M).group(1)
    return (field("Cipher name"), field("Cipher mode"), int(field("Payload offset")) * SECTOR,
            bytes.fromhex(key_hex))


def vectors_for(config, workdir, rng):
    alg, mode, ivgen, *ivhash = config
    keyfile, image = workdir / "key", workdir / "image.luks"
    keyfile.write_bytes(b"known answer")
    secret = f"secret,id=s0,file={keyfile}"
    options = f"key-secret=s0,cipher-alg={alg},cipher-mode={mode},ivgen-alg={ivgen},iter-time=100"
    if ivhash:
        options += f",ivgen-hash-alg={ivhash[0]}"
    image.unlink(missing_ok=True)
    for attempt in range(5):  # QEMU's PBKDF timing sometimes fails: "Unable to get accurate CPU usage"
        try:
            run("qemu-img", "create", "-q", "-f", "luks", "--object", secret, "-o", options,
                str(image), "3T")
            break
        except subprocess.CalledProcessError:
            if attempt == 4:
                raise
    plaintexts = {sector: rng.randbytes(2 * SECTOR) for sector in SECTORS}
    for sector, plaintext in plaintexts.items():
        pattern = workdir / "pattern"
        pattern.write_bytes(plaintext)
        run("qemu-io", "--object", secret, "--image-opts",
            f"driver=luks,key-secret=s0,file.filename={image}",
            "-c", f"write -q -s {pattern} {sector * SECTOR} {len(plaintext)}")
    name, cipher_mode, payload, key = luks_dump(image, keyfile)
    with open(image, "rb") as f:
        for sector, plaintext in plaintexts.items():
            f.seek(payload + sector * SECTOR)
            yield {"spec": f"{name}-{cipher_mode}", "key": key.hex(), "sector": sector,
                   "sector_size": SECTOR, "plaintext": plaintext.hex(),
                   "ciphertext": f.read(len(plaintext)).hex(),
                   "source": f"qemu-img create -f luks -o {options.split(',', 1)[1]}"}


def main():
    output = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("luks1_vectors.json"))
    rng = random.Random(1619)
    with tempfile.TemporaryDirectory() as tmp:
        vectors = [v for config in CONFIGS for v in vectors_for(config, Path(tmp), rng)]
    output.write_text(json.dumps(vectors, indent=1) + "\n")
    print(f"wrote {len(vectors)} vectors to {output}")


if __name__ == "__main__":
    main()
