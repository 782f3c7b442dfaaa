"""The queueing layer with a real file store and the real cipher engine."""

import itertools
import os
import threading
import time

import pytest

from nbdcrypt.control import ControlError, decode_reply, decode_request, encode_reply, encode_request
from nbdcrypt.crypto.engine import SectorCipher
from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.errors import InputError
from nbdcrypt.plugin.queueing import Settings
from nbdcrypt.plugin.store import FileStore
from nbdcrypt.plugin.throttle import Throttle
from nbdcrypt.plugin.volume import Volume

FLAGS = ("no_read_workqueue", "no_write_workqueue", "same_cpu_crypt", "submit_from_crypt_cpus")
SIZE = 1 << 20
KEY = bytes(range(64))


def volume_on(path, **settings):
    path.write_bytes(bytes(SIZE))
    cipher = SectorCipher(CipherSpec.parse("aes-xts-plain64"), KEY)
    volume = Volume(FileStore(path), cipher, 0, SIZE)
    volume.path.configure(settings)
    return volume


def workload(volume):
    """Concurrent writers, each in its own quarter so the outcome does not depend on
    scheduling: many sizes, unaligned offsets, overwrites."""
    lane = SIZE // 4

    def writer(seed):
        for i in range(40):
            length = 1 + (seed * 7919 + i * 104_729) % 60_000
            offset = seed * lane + (i * 12_289) % (lane - length)
            volume.write(bytes([seed * 40 + i & 0xFF]) * length, offset)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    volume.flush()


@pytest.mark.parametrize("flags", [dict(zip(FLAGS, bits)) for bits in itertools.product([False, True], repeat=4)],
                         ids=lambda f: "+".join(k for k, v in f.items() if v) or "dm-crypt-defaults")
def test_every_path_writes_the_same_ciphertext(tmp_path, flags):
    reference = volume_on(tmp_path / "ref", no_read_workqueue=True, no_write_workqueue=True)
    workload(reference)
    volume = volume_on(tmp_path / "img", **flags)
    workload(volume)
    assert (tmp_path / "img").read_bytes() == (tmp_path / "ref").read_bytes()
    plain = bytearray(SIZE)
    volume.read(plain, 0)
    reference.read(expected := bytearray(SIZE), 0)
    assert plain == expected
    volume.path.close()


def test_switching_while_busy_loses_nothing(tmp_path):
    volume = volume_on(tmp_path / "img")
    volume.zero(SIZE, 0)
    model = bytearray(SIZE)
    stop = threading.Event()

    def flipper():
        for bits in itertools.cycle(itertools.product([False, True], repeat=4)):
            if stop.is_set():
                return
            volume.path.configure({**dict(zip(FLAGS, bits)), "workers": 1 + bits[0] + bits[3]})
            time.sleep(0.001)

    def writer(lane):
        for i in range(200):
            offset = lane * (SIZE // 4) + (i * 4099) % (SIZE // 4 - 5000)
            data = os.urandom(1 + i * 37 % 5000)
            volume.write(data, offset)
            model[offset:offset + len(data)] = data
            got = bytearray(len(data))
            volume.read(got, offset)
            assert got == data

    threads = [threading.Thread(target=flipper)] + [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    whole = bytearray(SIZE)
    volume.read(whole, 0)
    assert whole == model
    stats = volume.path.stats.snapshot()
    assert stats["write"]["ops"] == 801 and stats["read"]["ops"] == 801  # + the zero and the check
    assert stats["read"]["errors"] == stats["write"]["errors"] == 0
    volume.path.close()


def test_stats_split_latency_by_mode_and_phase(tmp_path):
    volume = volume_on(tmp_path / "img", no_read_workqueue=True)
    volume.write(b"x" * 8192, 0)
    volume.read(bytearray(8192), 0)
    stats = volume.path.stats.snapshot()
    assert set(stats["read"]["latency_us"]) == {"inline"}
    assert set(stats["write"]["latency_us"]) == {"queued"}
    assert {"total", "crypto", "io"} <= set(stats["read"]["latency_us"]["inline"])
    assert "queue" in stats["write"]["latency_us"]["queued"]
    assert stats["write"]["bytes"] == stats["read"]["bytes"] == 8192
    volume.path.close()


def test_settings_reject_bad_values():
    with pytest.raises(InputError, match="unknown setting bogus"):
        Settings().updated({"bogus": "1"})
    with pytest.raises(InputError, match="takes on/off"):
        Settings().updated({"same_cpu_crypt": "maybe"})
    with pytest.raises(InputError, match="whole number"):
        Settings().updated({"throttle_bps": "-5"})
    assert Settings().updated({"no_read_workqueue": "on", "workers": "3"}) == \
        Settings(no_read_workqueue=True, workers=3)


def test_throttle_holds_the_byte_rate():
    throttle = Throttle(bps=4 << 20)
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < 2.0:
        throttle.wait(64 << 10)
        sent += 64 << 10
    rate = (sent - (4 << 20)) / (time.monotonic() - start)  # minus the one-second burst
    assert 0.9 * (4 << 20) <= rate <= 1.1 * (4 << 20)


def test_control_protocol_round_trip_and_malformed_input():
    assert decode_request(encode_request("set", {"workers": 2})) == ("set", {"workers": 2})
    assert decode_reply(encode_reply({"a": 1})) == {"a": 1}
    with pytest.raises(ControlError, match="boom"):
        decode_reply(encode_reply(error="boom"))
    for bad, message in [(b"nope\n", "not JSON"), (b"[1]\n", "JSON object"),
                         (b'{"command": "rm"}\n', "unknown command"),
                         (b'{"command": "set", "args": []}\n', "args must be an object")]:
        with pytest.raises(ControlError, match=message):
            decode_request(bad)
