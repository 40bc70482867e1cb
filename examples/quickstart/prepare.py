#!/usr/bin/env python3
"""The dataset-preparation job (the seed's "prepare dataset" Space, locally).

Builds a versioned dataset from every reviewed ticket (train/eval split),
writes it under datasets/<version_tag>/ and then publishes
datasets/dataset_metadata.json, the file retrain polls. Publishing last and
atomically (write + rename) means retrain never sees a half-written version.
"""
import datetime as dt
import json
import os
import random
import sqlite3
import sys


def main():
    db = os.environ.get("QUICKSTART_DB", "feedback.db")
    out = os.environ.get("QUICKSTART_DATASETS", "datasets")
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT text, corrected FROM reviews WHERE label = 'department' ORDER BY id").fetchall()
    if not rows:
        print("no reviewed tickets yet", file=sys.stderr)
        return 1
    now = dt.datetime.now(dt.timezone.utc)
    version = "v" + now.strftime("%Y%m%d_%H%M%S_%f")
    rng = random.Random(len(rows))
    rng.shuffle(rows)
    n_eval = max(1, len(rows) // 5)
    splits = {"eval": rows[:n_eval], "train": rows[n_eval:]}
    directory = os.path.join(out, version)
    os.makedirs(directory, exist_ok=True)
    for name, items in splits.items():
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
            for text, label in items:
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    metadata = {
        "dataset_name": "quickstart/ticket_department",
        "version_tag": version,
        "num_samples": len(rows),
        "splits": {k: len(v) for k, v in splits.items()},
        "created_at": now.isoformat(),
    }
    tmp = os.path.join(out, ".dataset_metadata.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metadata, f, indent=2)
    os.replace(tmp, os.path.join(out, "dataset_metadata.json"))
    print(f"published {version} with {len(rows)} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
