#!/usr/bin/env python3
"""The parse+aggregate loop of shared/bench/speed_consumer_ck.py, on a JSON-lines file instead
of a Kafka topic: json.loads per event, exact counters and revenue per (hour, app, source,
campaign, country, event), exact distinct devices per (day, app). Prints events/s first."""
import json
import sys
import time
from collections import defaultdict


def main(path):
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    intern = sys.intern
    counts = defaultdict(int)
    revenue = defaultdict(float)
    uniq = defaultdict(set)
    t0 = time.perf_counter()
    for v in lines:
        d = json.loads(v)
        et = d["event_time"]
        app = intern(d["app_id"])
        k = (et[:13], app, intern(d["media_source"]), intern(d.get("campaign") or ""), intern(d["country"]),
             intern(d["event_name"]))
        counts[k] += 1
        r = d.get("revenue_usd")
        if r is not None:
            revenue[k] += r
        uniq[(et[:10], app)].add(d["device_id"])
    el = time.perf_counter() - t0
    print(f"{len(lines) / el:.0f} events/s, {len(counts)} cube keys, {len(uniq)} day-app keys")


if __name__ == "__main__":
    main(sys.argv[1])
