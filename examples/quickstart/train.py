#!/usr/bin/env python3
"""The training job: a tiny multinomial Naive Bayes ticket router.

Follows retrain's command-trainer protocol: reads RETRAIN_DATASET_VERSION,
trains on exactly that dataset version, evaluates on its eval split and
writes {"candidate": ..., "metrics": {...}} to $RETRAIN_RESULT. The gate in
retrain.toml compares these metrics with the production model's.
"""
import collections
import json
import math
import os
import sys


def tokens(text):
    return [t for t in text.lower().replace(",", " ").replace(":", " ").split() if t]


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train(rows):
    priors = collections.Counter(r["label"] for r in rows)
    counts = {label: collections.Counter() for label in priors}
    for r in rows:
        counts[r["label"]].update(tokens(r["text"]))
    vocab = {t for c in counts.values() for t in c}
    return {"priors": dict(priors), "counts": {k: dict(v) for k, v in counts.items()},
            "vocab_size": len(vocab)}


def predict(model, text):
    total = sum(model["priors"].values())
    best, best_score = None, -math.inf
    for label, prior in model["priors"].items():
        counts = model["counts"][label]
        denom = sum(counts.values()) + model["vocab_size"]
        score = math.log(prior / total)
        for t in tokens(text):
            score += math.log((counts.get(t, 0) + 1) / denom)
        if score > best_score:
            best, best_score = label, score
    return best


def macro_f1(pairs, labels):
    f1s = []
    for label in labels:
        tp = sum(1 for y, p in pairs if y == label and p == label)
        fp = sum(1 for y, p in pairs if y != label and p == label)
        fn = sum(1 for y, p in pairs if y == label and p != label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(f1s) / len(f1s)


def main():
    version = os.environ["RETRAIN_DATASET_VERSION"]
    result_path = os.environ["RETRAIN_RESULT"]
    root = os.path.join(os.environ.get("QUICKSTART_DATASETS", "datasets"), version)
    train_rows = load(os.path.join(root, "train.jsonl"))
    eval_rows = load(os.path.join(root, "eval.jsonl"))
    print(f"training on {version}: {len(train_rows)} train / {len(eval_rows)} eval", file=sys.stderr)
    model = train(train_rows)
    pairs = [(r["label"], predict(model, r["text"])) for r in eval_rows]
    accuracy = sum(1 for y, p in pairs if y == p) / len(pairs)
    f1 = macro_f1(pairs, sorted(model["priors"]))
    candidate = f"nb-{version}-attempt{os.environ.get('RETRAIN_ATTEMPT', '1')}"
    os.makedirs("models", exist_ok=True)
    with open(os.path.join("models", f"{candidate}.json"), "w") as f:
        json.dump(model, f)
    with open(result_path, "w") as f:
        json.dump({"candidate": candidate,
                   "metrics": {"accuracy": round(accuracy, 4), "macro_f1": round(f1, 4)}}, f)
    print(f"accuracy={accuracy:.4f} macro_f1={f1:.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
