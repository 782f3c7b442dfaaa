"""Soak run: many clients of mixed, verified I/O against one export for a long time.

Formats an image with `nbdcrypt format`, serves it, and runs fio (nbd ioengine) with
--clients writer connections (random writes of 4 KiB-1 MiB, each writer in its own
region, every block read back and crc32c-checked while the run goes on) next to as
many reader connections (random reads over the whole export).  Every --sample seconds
it records the resident memory of the nbdkit process that holds the export, and at the
end the export's own error counters (`nbdcrypt ctl stats`).

Writes OUT/soak.json and OUT/rss.png; prints one summary line.  Exit status 1 when fio
reports an error or a verify failure, the export counted an error, or resident memory
grew by more than --max-growth between the end of warm-up (the first quarter) and the
end of the run.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.run import progress, size
from bench.targets import _await_socket, _stop_group

PASSPHRASE = b"soak test passphrase"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30, help="length of the run (default: %(default)s)")
    p.add_argument("--clients", type=int, default=8,
                   help="writer connections, and as many readers (default: %(default)s)")
    p.add_argument("--type", choices=("luks1", "luks2", "qcow2"), default="luks2",
                   help="image format (default: %(default)s)")
    p.add_argument("--size", type=size, default="2G", help="payload size (default: %(default)s)")
    p.add_argument("--sample", type=float, default=10, help="seconds between memory samples (default: %(default)s)")
    p.add_argument("--max-growth", type=float, default=0.10,
                   help="allowed RSS growth after warm-up, as a fraction (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("docs/bench/soak"), help="results directory (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    nbdcrypt = str(Path(sys.executable).with_name("nbdcrypt"))
    with tempfile.TemporaryDirectory(prefix="nbdcrypt-soak-") as tmp:
        work = Path(tmp)
        key, image, sock, control = work / "key", work / "image", work / "s.sock", work / "control.sock"
        key.write_bytes(PASSPHRASE)
        fmt = ["--pbkdf", "pbkdf2"] if args.type == "luks2" else []
        subprocess.run([nbdcrypt, "format", "--type", args.type, *fmt, "--iter-time", "10", "--key-file", key,
                        image, str(args.size)], check=True, capture_output=True)
        log = work / "serve.log"
        with open(log, "wb") as out:
            server = subprocess.Popen([nbdcrypt, "serve", image, "--key-file", key, "--socket", sock,
                                       "--control", control], stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            _await_socket(server, sock, 60, log)
            samples = []
            sampler = threading.Thread(target=_sample_rss, args=(server.pid, args, samples), daemon=True)
            sampler.start()
            fio = _fio(f"nbd+unix:///?socket={sock}", args, work)
            stats = json.loads(subprocess.run([nbdcrypt, "ctl", control, "stats", "--json"], check=True,
                                              capture_output=True, text=True).stdout)
        finally:
            _stop_group(server)
    result = _summarise(args, fio, stats, samples)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    _chart(samples, args.out / "rss.png")
    print(result["summary"])
    return 0 if result["ok"] else 1


def _fio(uri, args, work):
    """Writers verify what they wrote as they go (verify_backlog); readers add load."""
    region = args.size // args.clients
    common = ["--ioengine=nbd", f"--uri={uri}", "--time_based", f"--runtime={int(args.minutes * 60)}s",
              "--group_reporting=0"]
    cmd = ["fio", "--output-format=json", f"--output={work / 'fio.json'}",
           "--name=writers", *common, f"--numjobs={args.clients}", "--rw=randwrite",
           "--bssplit=4k/50:64k/30:1m/20", f"--size={region}", f"--offset_increment={region}",
           "--iodepth=4", "--verify=crc32c", "--verify_backlog=64", "--verify_fatal=1",
           "--name=readers", *common, f"--numjobs={args.clients}", "--rw=randread",
           "--bssplit=4k/50:64k/30:1m/20", f"--size={args.size}", "--iodepth=2"]
    subprocess.run(cmd, check=False, capture_output=True, cwd=work)
    return json.loads((work / "fio.json").read_text())


def _sample_rss(serve_pid, args, samples):
    """(seconds, KiB) of nbdkit's resident memory every ``args.sample`` seconds, until
    it goes away; a progress line each minute."""
    start = time.monotonic()
    while (pid := _nbdkit_pid(serve_pid)) is not None:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        samples.append((round(time.monotonic() - start, 1), rss))
        if len(samples) % max(1, round(60 / args.sample)) == 1:
            progress(f"[{samples[-1][0] / 60:5.1f}/{args.minutes:g} min] nbdkit RSS {rss / 1024:.0f} MiB")
        time.sleep(args.sample)


def _nbdkit_pid(serve_pid):
    children = subprocess.run(["pgrep", "-P", str(serve_pid), "nbdkit"], capture_output=True, text=True).stdout.split()
    return int(children[0]) if children else None


def _summarise(args, fio, stats, samples):
    jobs = fio["jobs"]
    errors = sum(job["error"] for job in jobs)
    moved = {d: sum(job[d]["io_bytes"] for job in jobs) for d in ("read", "write")}
    export_errors = sum(direction.get("errors", 0) for direction in stats.values() if isinstance(direction, dict))
    warm = [kib for t, kib in samples if t >= args.minutes * 15][:3] or [samples[0][1]]
    end = [kib for _, kib in samples[-3:]]
    growth = max(end) / max(warm) - 1
    ok = errors == 0 and export_errors == 0 and growth <= args.max_growth
    summary = (f"soak {args.type}: {args.minutes:g} min, {args.clients} writers + {args.clients} readers, "
               f"{moved['write'] / 2**30:.1f} GiB written and verified, {moved['read'] / 2**30:.1f} GiB read, "
               f"fio errors {errors}, export errors {export_errors}, RSS {max(warm) / 1024:.0f} -> "
               f"{max(end) / 1024:.0f} MiB ({growth:+.1%}) -> {'PASS' if ok else 'FAIL'}")
    return {"ok": ok, "summary": summary, "minutes": args.minutes, "clients": args.clients, "type": args.type,
            "fio_errors": errors, "export_errors": export_errors, "bytes": moved, "rss_kib": samples,
            "rss_growth": growth}


def _chart(samples, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([t / 60 for t, _ in samples], [kib / 1024 for _, kib in samples])
    ax.set_xlabel("minutes")
    ax.set_ylabel("nbdkit RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.set_title("resident memory during the soak run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
