"""qcow2+LUKS through nbdcrypt serve, checked by QEMU: data both ways, block status."""

import json

from tests.conftest import qemu_img_create, random_file, serving
from tests.tools import nbdcrypt_cmd, require, run

SIZE = 16 << 20


def qemu_opts(image, key_file):
    return ["--object", f"secret,id=s0,file={key_file}", "--image-opts",
            f"driver=qcow2,encrypt.key-secret=s0,file.filename={image}"]


def test_qemu_and_nbdcrypt_agree_on_a_served_qcow2(tmp_path, key_file):
    require("qemu-img", "qemu-io", "nbdcopy", "nbdinfo")
    image = tmp_path / "img.qcow2"
    qemu_img_create("-f", "qcow2", "--object", f"secret,id=s0,file={key_file}",
                    "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,cluster_size=65536",
                    image, SIZE)
    run(["qemu-io"] + qemu_opts(image, key_file) + ["-c", "write -P 0x3c 1M 200k"])
    with serving(image, key_file) as uri:
        extents = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
        assert [(e["offset"], e["length"], e["type"]) for e in extents][:3] == \
            [(0, 1 << 20, 3), (1 << 20, 256 << 10, 0), ((1 << 20) + (256 << 10), SIZE - (1 << 20) - (256 << 10), 3)]
        out = tmp_path / "out"
        run(["nbdcopy", uri, str(out)])
        assert out.read_bytes()[(1 << 20):(1 << 20) + (200 << 10)] == b"\x3c" * (200 << 10)
        raw = random_file(tmp_path / "raw", SIZE, seed=11)
        run(["nbdcopy", "--flush", str(raw), uri])
    check = json.loads(run(["qemu-img", "check", "--output=json"] + qemu_opts(image, key_file)).stdout)
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0
    result = run(["qemu-img", "compare", "--object", f"secret,id=s0,file={key_file}", "--image-opts",
                  f"driver=raw,file.filename={raw}", qemu_opts(image, key_file)[-1]])
    assert "Images are identical" in result.stdout


def test_format_qcow2_makes_images_qemu_accepts(tmp_path, key_file):
    require("qemu-img")
    image = tmp_path / "new.qcow2"
    run(nbdcrypt_cmd() + ["format", "--type", "qcow2", str(image), "8M", "--key-file", str(key_file),
                          "--iter-time", "10", "--cluster-size", "4K"])
    info = json.loads(run(["qemu-img", "info", "--output=json"] + qemu_opts(image, key_file)).stdout)
    assert info["virtual-size"] == 8 << 20 and info["cluster-size"] == 4096
    assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"


def test_fio_verify_on_a_served_qcow2_then_qemu_check(tmp_path, key_file):
    """Heavy allocating writes (4 KiB clusters, so the tables and refcounts grow), then QEMU."""
    require("fio", "qemu-img")
    image = tmp_path / "fio.qcow2"
    run(nbdcrypt_cmd() + ["format", "--type", "qcow2", str(image), "32M", "--key-file", str(key_file),
                          "--iter-time", "10", "--cluster-size", "4K"])
    with serving(image, key_file) as uri:
        result = run(["fio", "--name=qcow2", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                      "--bssplit=4k/50:12k/30:64k/20", "--size=12M", "--numjobs=2", "--offset_increment=16M",
                      "--iodepth=8", "--verify=crc32c", "--verify_fatal=1", "--output-format=json"], cwd=tmp_path)
    jobs = json.loads(result.stdout[result.stdout.index("{"):])["jobs"]
    assert all(job["error"] == 0 and job["read"]["io_bytes"] > 0 for job in jobs)
    check = json.loads(run(["qemu-img", "check", "--output=json"] + qemu_opts(image, key_file)).stdout)
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0 and check.get("check-errors", 0) == 0
