#!/usr/bin/env python3
"""Write a project of N labels with local command trainers into DIR, for
`retrain status` / `retrain run` at scale (docs/BENCHMARKS.md, eighth
session): `retrain.toml` and `metadata.json` (version v1).

    python3 scripts/many-labels.py 10000 DIR             # every label written out (2.4 MB),
                                                          # as `scenarios labels` writes it
    python3 scripts/many-labels.py 10000 DIR --defaults  # the shared keys in [label_defaults] (0.2 MB)
    python3 scripts/many-labels.py 10000 DIR --defaults --per-label-metadata
                                                          # each label its own metadata file,
                                                          # through {label} (data/<label>.json)
"""
import json
import pathlib
import sys

TRAINER = (
    '{ command = ["sh", "-c", "printf \'{\\"candidate\\": \\"c\\", \\"metrics\\": '
    '{\\"accuracy\\": 0.9}}\' > \\"$RETRAIN_RESULT\\""], timeout = "5m" }'
)
SHARED = (
    'threshold = 10\ncounts = "none"\nmetadata = "file://metadata.json"\n'
    f"trainer = {TRAINER}\ngate = \"none\"\n"
)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2 or not args[0].isdigit():
        sys.exit(__doc__)
    labels, out = int(args[0]), pathlib.Path(args[1])
    defaults = "--defaults" in sys.argv
    per_label = "--per-label-metadata" in sys.argv
    out.mkdir(parents=True, exist_ok=True)
    text = [
        'state = "sqlite://.retrain/state.db"\nstate_dir = ".retrain"\nmax_parallel_labels = 64\n'
    ]
    shared = SHARED
    if per_label:
        shared = shared.replace("file://metadata.json", "file://data/{label}.json")
    if defaults:
        text.append(f"[label_defaults]\n{shared}")
    for n in range(labels):
        own = "" if defaults else shared.replace("{label}", f"label-{n:05}")
        text.append(f"[labels.label-{n:05}]\n" + own)
    (out / "retrain.toml").write_text("".join(text))
    metadata = {
        "dataset_name": "bench",
        "version_tag": "v1",
        "num_samples": 100,
        "created_at": "2026-12-01T00:00:00Z",
    }
    (out / "metadata.json").write_text(json.dumps(metadata))
    if per_label:
        (out / "data").mkdir(exist_ok=True)
        for n in range(labels):
            (out / "data" / f"label-{n:05}.json").write_text(json.dumps(metadata))


if __name__ == "__main__":
    main()
