"""fio's nbd ioengine with verification against a served image."""

import json

from tests.conftest import nbdcrypt_luks1, serving
from tests.tools import require, run


def test_fio_verify_crc32c(tmp_path, key_file):
    require("fio")
    image = tmp_path / "fio.img"
    nbdcrypt_luks1(image, key_file, "64M")
    with serving(image, key_file) as uri:
        result = run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                      "--bssplit=4k/50:64k/30:1m/20", "--size=24M", "--iodepth=8", "--numjobs=2",
                      "--offset_increment=32M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                      "--output-format=json"], cwd=tmp_path)  # fio leaves verify state files in cwd
    jobs = json.loads(result.stdout[result.stdout.index("{"):])["jobs"]
    assert all(job["error"] == 0 for job in jobs)
    assert sum(job["write"]["io_bytes"] for job in jobs) > 0
    assert sum(job["read"]["io_bytes"] for job in jobs) > 0  # the verify pass read everything back
