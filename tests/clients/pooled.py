"""Python urllib3 clients with keep-alive connection pools, as `requests` uses them: `workers`
threads, each with its own pool (so each keeps one connection), send GET requests to `target`
until `seconds` pass, pausing `every` seconds between requests, with urllib3's default
retries, or none with a sixth argument `no-retries` (the fifth is the path, default `/`).
Prints {"ok": N, "failed": N, "errors": [...]} as JSON. Works with urllib3 1.26 (Debian 12)
and 2.x."""

import json
import sys
import threading
import time

import urllib3


def main():
    if len(sys.argv) not in (5, 6, 7):
        sys.exit(
            "usage: pooled.py <host:port> <workers> <seconds> <every-seconds> [path] [no-retries]"
        )
    host, port = sys.argv[1].rsplit(":", 1)
    workers, seconds, every = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    path = sys.argv[5] if len(sys.argv) > 5 else "/"
    # urllib3's default (Retry(3)) unless told otherwise: False makes any failure count.
    retries = False if sys.argv[6:] == ["no-retries"] else urllib3.Retry.DEFAULT
    lock = threading.Lock()
    counts = {"ok": 0, "failed": 0, "errors": []}
    deadline = time.monotonic() + seconds

    def work():
        timeout = urllib3.Timeout(connect=2, read=5)
        pool = urllib3.HTTPConnectionPool(host, int(port), maxsize=1, timeout=timeout)
        while time.monotonic() < deadline:
            try:
                pool.request("GET", path, retries=retries).data
                outcome = None
            except Exception as e:  # every failure counts; the test reads them
                outcome = repr(e)
            with lock:
                if outcome is None:
                    counts["ok"] += 1
                else:
                    counts["failed"] += 1
                    if len(counts["errors"]) < 5:
                        counts["errors"].append(outcome)
            time.sleep(every)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
