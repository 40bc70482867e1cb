#!/usr/bin/env python3
"""Create (or extend) the quickstart's feedback database.

A miniature of the seed pipeline: a support-ticket router predicts a
department for each ticket; humans review tickets and record the correct
department. `reviews` is that table. retrain counts the reviewed rows whose
prediction was wrong (misclassified) or right (correct) since the last
dataset it consumed.

    python3 seed_feedback.py            # create feedback.db with 240 reviews
    python3 seed_feedback.py --add 60   # append 60 new reviews (a new batch)

The database is created next to this script (where retrain.toml's
`sqlite://feedback.db` points), whatever the working directory.
"""
import argparse
import datetime as dt
import os
import random
import sqlite3
import sys

DEPARTMENTS = {
    "billing": ["invoice", "refund", "charged twice", "payment failed", "receipt",
                "subscription price", "credit card", "billing address", "overcharged", "vat"],
    "technical": ["app crashes", "cannot log in", "error 500", "password reset", "slow page",
                  "bug in export", "api timeout", "two factor", "sync broken", "blank screen"],
    "shipping": ["parcel late", "tracking number", "wrong address", "damaged box", "courier",
                 "delivery date", "lost package", "customs", "return label", "pickup point"],
}
OPENERS = ["hello,", "hi team,", "urgent:", "please help,", "good morning,", ""]
CLOSERS = ["thanks", "regards", "asap please", "", "cheers", "any update?"]


def ticket(rng, department):
    own = rng.sample(DEPARTMENTS[department], rng.choice([1, 1, 2]))
    # Noise from other departments keeps the task realistic: a billing
    # ticket may well mention a delivery or a login.
    others = [d for d in DEPARTMENTS if d != department]
    noise = [rng.choice(DEPARTMENTS[rng.choice(others)])
             for _ in range(rng.choice([0, 0, 1, 1, 2]))]
    words = own + noise
    rng.shuffle(words)
    return " ".join(p for p in [rng.choice(OPENERS), " and ".join(words),
                                rng.choice(CLOSERS)] if p)


def main():
    parser = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--db", default=os.path.join(here, "feedback.db"))
    parser.add_argument("--add", type=int, default=0, help="append N new reviews")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    conn = sqlite3.connect(args.db)
    conn.execute("""CREATE TABLE IF NOT EXISTS reviews (
        id INTEGER PRIMARY KEY,
        label TEXT NOT NULL,          -- the model line (retrain's label)
        text TEXT NOT NULL,
        predicted TEXT NOT NULL,      -- what production predicted
        corrected TEXT NOT NULL,      -- what the reviewer says
        reviewed_at TEXT NOT NULL     -- RFC 3339, UTC
    )""")
    existing = conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0]
    count = args.add if args.add else (0 if existing else 240)
    if count == 0:
        print(f"{args.db} already has {existing} reviews; use --add N to add more")
        return 0
    rng = random.Random(args.seed + existing)
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for i in range(count):
        truth = rng.choice(sorted(DEPARTMENTS))
        # The production model is wrong on about a third of reviewed tickets
        # (reviewers mostly look at doubtful predictions).
        predicted = truth if rng.random() > 0.35 else rng.choice(sorted(DEPARTMENTS))
        # Reviews happen "now" (a millisecond apart), after any dataset
        # already prepared, so they count towards the next one.
        reviewed = now - dt.timedelta(milliseconds=count - i)
        rows.append(("department", ticket(rng, truth), predicted, truth, reviewed.isoformat()))
    conn.executemany(
        "INSERT INTO reviews (label, text, predicted, corrected, reviewed_at) VALUES (?,?,?,?,?)",
        rows)
    conn.commit()
    wrong = sum(1 for r in rows if r[2] != r[3])
    print(f"added {count} reviews to {args.db} ({wrong} misclassified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
