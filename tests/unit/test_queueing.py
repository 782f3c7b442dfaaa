"""The queueing layer with a real file store and the real cipher engine."""

import itertools
import os
import threading
import time

import pytest
from prometheus_client import parser

from nbdcrypt.control import ControlError, decode_reply, decode_request, encode_reply, encode_request
from nbdcrypt.crypto.engine import SectorCipher
from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.datapath.settings import PERF_FLAGS, Settings
from nbdcrypt.datapath.stats import BUCKETS_US, FOLD, Stats, Timing
from nbdcrypt.datapath.throttle import Throttle
from nbdcrypt.datapath.volume import Volume
from nbdcrypt.datapath.workers import SLOT, CipherRecipe, ProcessWorkers
from nbdcrypt.errors import InputError
from nbdcrypt.plugin.metrics import render
from nbdcrypt.storage.store import FileStore

SIZE = 1 << 20
KEY = bytes(range(64))


def volume_on(path, **settings):
    """A volume whose requests take the path the flags in ``settings`` say, whatever
    their size (unless ``settings`` set inline_below)."""
    path.write_bytes(bytes(SIZE))
    cipher = SectorCipher(CipherSpec.parse("aes-xts-plain64"), KEY)
    volume = Volume(FileStore(path), cipher, 0, SIZE)
    volume.path.register(volume.cipher, KEY)
    volume.path.configure({"inline_below": 0, **settings})
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


PROCESS_PATHS = [dict(worker_type="process", workers=2), dict(worker_type="process", same_cpu_crypt=True),
                 dict(worker_type="process", submit_from_crypt_cpus=True)]


@pytest.mark.parametrize("flags", [dict(zip(PERF_FLAGS, bits, strict=True))
                                   for bits in itertools.product([False, True], repeat=4)]
                         + PROCESS_PATHS,
                         ids=lambda f: "+".join(k if v is True else f"{k}={v}" for k, v in f.items() if v)
                         or "dm-crypt-defaults")
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
            volume.path.configure({**dict(zip(PERF_FLAGS, bits, strict=True)), "workers": 1 + bits[0] + bits[3]})
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


def test_requests_below_inline_below_run_inline_whatever_the_flags(tmp_path):
    volume = volume_on(tmp_path / "img", inline_below=8192)
    for length in (512, 4096, 8191, 8192, 65536):  # 3 below, 2 at or above
        volume.write(os.urandom(length), 1000)
        volume.read(bytearray(length), 1000)
    volume.path.configure({"inline_below": "0"})  # live: the next request is queued
    volume.read(bytearray(512), 0)
    volume.path.configure({"inline_below": str(1 << 20), "no_read_workqueue": "on"})
    volume.read(bytearray(1 << 20), 0)  # not below 1 MiB, and inline as its flag says
    stats = volume.path.stats.snapshot()
    for direction, inline, queued in (("write", 3, 2), ("read", 4, 3)):
        modes = stats[direction]["latency_us"]
        assert modes["inline"]["total"]["count"] == inline and modes["queued"]["total"]["count"] == queued
        assert "queue" not in modes["inline"] and modes["queued"]["queue"]["count"] == queued
    volume.path.close()


def test_stats_batch_keeps_exact_counts_and_close_percentiles():
    """Requests are folded into the histograms in batches of FOLD: a snapshot still counts every
    finished one, the sums are exact and the percentiles within a bin's width (1.6 %)."""
    stats = Stats()
    durations = [(i % 1000 + 1) * 1e-6 for i in range(2007)]  # 1..1000 us, twice
    assert len(durations) % FOLD  # and not whole batches
    for seconds in durations:
        stats.started("write")
        timing = Timing()
        timing.phases.update(total=seconds, crypto=seconds / 2)
        stats.finished("write", "inline", 4096, timing.phases, ok=True)
    stats.started("write")
    stats.finished("write", "inline", 4096, Timing().phases, ok=False)
    snapshot = stats.snapshot(buckets=True)["write"]
    assert (snapshot["ops"], snapshot["errors"], snapshot["bytes"]) == (len(durations) + 1, 1, 4096 * len(durations))
    assert snapshot["in_flight"] == 0 and snapshot["peak_in_flight"] == 1
    total = snapshot["latency_us"]["inline"]["total"]
    assert total["count"] == len(durations) and total["sum"] == pytest.approx(sum(durations) * 1e6)
    assert total["max"] == 1000 and total["p50"] == pytest.approx(500, rel=0.016)
    assert total["p99"] == pytest.approx(990, rel=0.016)
    assert total["buckets"][:4] == [sum(d * 1e6 <= bound for d in durations) for bound in BUCKETS_US[:4]]
    assert set(snapshot["latency_us"]["inline"]) == {"total", "crypto"}  # phases the path had


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


def test_switching_worker_type_while_busy_loses_nothing(tmp_path):
    volume = volume_on(tmp_path / "img")
    volume.zero(SIZE, 0)
    model = bytearray(SIZE)
    switched = threading.Event()
    pids = set()

    def switcher():
        for kind in ["process", "thread"] * 3:
            volume.path.configure({"worker_type": kind, "workers": 2})
            pids.update(volume.path.worker_pids())
            time.sleep(0.05)
        switched.set()

    def writer(lane):
        for i in itertools.count():
            if switched.is_set():
                return
            offset = lane * (SIZE // 4) + (i * 4099) % (SIZE // 4 - (5 << 10))
            data = os.urandom(1 + i * 41 % (5 << 10))
            volume.write(data, offset)
            model[offset:offset + len(data)] = data
            got = bytearray(len(data))
            volume.read(got, offset)
            assert got == data

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)] + [threading.Thread(target=switcher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    volume.read(whole := bytearray(SIZE), 0)
    assert whole == model
    assert len(pids) == 6  # three pools of two processes
    assert volume.path.stats.snapshot()["write"]["errors"] == 0
    volume.path.close()


def test_worker_processes_cross_the_shared_slot(tmp_path):
    """Requests longer than a worker's shared-memory slot go through it in pieces."""
    size = SLOT * 2 + 4096
    path = tmp_path / "img"
    path.write_bytes(bytes(size))
    cipher = SectorCipher(CipherSpec.parse("aes-xts-plain64"), KEY)
    data = os.urandom(size)
    expected = bytearray(data)
    cipher.encrypt(expected, 0)
    with Volume(FileStore(path), cipher, 0, size) as volume:
        volume.path.register(volume.cipher, KEY)
        volume.path.configure({"worker_type": "process", "workers": 1})
        volume.write(data, 0)
        assert path.read_bytes() == expected
        volume.read(got := bytearray(size), 0)
        assert got == data


@pytest.mark.parametrize("spec, sector_size, iv_large_sectors, iv_tweak", [
    ("aes-xts-plain64", 4096, True, 7), ("aes-xts-plain64", 4096, False, 3), ("aes-cbc-essiv:sha256", 512, False, 0)])
def test_worker_processes_rebuild_the_cipher(spec, sector_size, iv_large_sectors, iv_tweak):
    """Sector size and IV options reach the worker: it encrypts as the plugin's own cipher."""
    key = KEY[:64 if "xts" in spec else 32]
    cipher = SectorCipher(CipherSpec.parse(spec), key, sector_size, iv_large_sectors, iv_tweak)
    recipe = CipherRecipe(cipher, key)
    pool = ProcessWorkers([recipe], 1)
    data = bytearray(os.urandom(3 * sector_size))
    expected = bytearray(data)
    cipher.encrypt(expected, 12345)
    pool.enter()
    pool.run(Timing(), cipher, True, data, 12345)
    pool.close()
    recipe.wipe()
    assert data == expected and recipe.key == bytes(len(key))


def test_worker_type_needs_a_known_value_and_the_key(tmp_path):
    with pytest.raises(InputError, match="worker_type takes thread or process"):
        Settings().updated({"worker_type": "fork"})
    path = tmp_path / "img"
    path.write_bytes(bytes(SIZE))
    with Volume(FileStore(path), SectorCipher(CipherSpec.parse("aes-xts-plain64"), KEY), 0, SIZE) as volume:
        with pytest.raises(InputError, match="need the key"):
            volume.path.configure({"worker_type": "process"})
        assert volume.path.settings.worker_type == "thread"


def test_metrics_text_parses_and_matches_the_statistics(tmp_path):
    volume = volume_on(tmp_path / "img", no_read_workqueue=True)
    for length in (512, 4096, 70_000):
        volume.write(bytes(length), 1024)
    volume.read(bytearray(4096), 0)
    stats = volume.path.stats.snapshot(buckets=True)
    families = {f.name: f for f in parser.text_string_to_metric_families(render(stats))}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("nbdcrypt_requests_total", (("direction", "write"),))] == 3
    assert samples[("nbdcrypt_bytes_total", (("direction", "write"),))] == 512 + 4096 + 70_000
    assert samples[("nbdcrypt_request_duration_seconds_count", (("direction", "read"), ("mode", "inline")))] == 1
    assert families["nbdcrypt_request_phase_duration_seconds"].type == "histogram"
    crypto = (("direction", "write"), ("mode", "queued"), ("phase", "crypto"))
    assert samples[("nbdcrypt_request_phase_duration_seconds_count", crypto)] == 3
    assert samples[("nbdcrypt_request_phase_duration_seconds_sum", crypto)] == pytest.approx(
        stats["write"]["latency_us"]["queued"]["crypto"]["sum"] / 1e6)
    buckets = [s.value for s in families["nbdcrypt_request_phase_duration_seconds"].samples
               if s.name.endswith("_bucket") and {k: v for k, v in s.labels.items() if k != "le"} == dict(crypto)]
    assert len(buckets) == len(BUCKETS_US) + 1  # and +Inf
    assert buckets == sorted(buckets) and buckets[-1] == 3  # cumulative: +Inf holds every request
    volume.path.close()


def test_non_ascii_digits_are_not_numbers():
    # "²".isdigit() is true but int("²") raises: such text is a path or a group name, not a number.
    from nbdcrypt.daemon.listener import _gid
    from nbdcrypt.plugin.metrics import parse_address

    assert parse_address("12²") == ("unix", "12²")
    with pytest.raises(InputError, match="no such group"):
        _gid("²")
