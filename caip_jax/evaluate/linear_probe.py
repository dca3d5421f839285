"""Linear probes and retrieval on frozen features: the report `caip-linear-probe` writes.

For each model row (the checkpoint, and baselines of the same architecture at random init and
at SigLIP 2 init) and each feature kind (features.KINDS), on records it never trained on:
- ridge regression of the normalised action chunk: R^2 overall and over the first 8/32/64 steps,
  and by horizon for the plot;
- logistic regression of every label the records carry (the demo world: target, hand, verb);
- retrieval between image+text (`image_pooled`) and the action, recall@1/5/10 both ways.
"""
import json
import logging

import numpy as np

from caip_jax import storage
from caip_jax.evaluate import features, plot, probes, retrieval

PLOT_HORIZONS = (1, 2, 4, 8, 16, 32, 64)


def probe_features(train: dict, test: dict) -> dict:
    """Every probe for every feature kind: {kind: {"action_r2": {...}, "r2_by_horizon": {h: r2},
    "accuracy": {label: acc}}}. train, test: `features.extract` outputs."""
    steps = train["action"].shape[1]
    horizons = [h for h in PLOT_HORIZONS if h <= steps]
    n = len(train["action"])
    y_train = train["action"].reshape(n, -1)
    w_train = np.broadcast_to(train["action_mask"][..., None, None], train["action"].shape).reshape(n, -1)
    results = {}
    for kind in features.KINDS:
        ridge = probes.fit_ridge(train[kind], y_train, weights=w_train)
        predicted = np.asarray(probes.predict(ridge, test[kind])).reshape(test["action"].shape)
        by_horizon = probes.horizon_r2(test["action"], predicted, test["action_mask"], horizons)
        accuracy = {}
        for label in sorted(set(train["labels"]) & set(test["labels"])):
            train_ids, test_ids, classes = probes.encode_labels(list(train["labels"][label]), list(test["labels"][label]))
            if len(classes) < 2:
                continue
            logistic = probes.fit_logistic(train[kind], train_ids, len(classes))
            accuracy[label] = probes.accuracy(test_ids, probes.predict_logistic(logistic, test[kind]))
        results[kind] = dict(
            action_r2={k: by_horizon[k] for k in ("overall", "first_8", "first_32", "first_64") if k in by_horizon},
            r2_by_horizon={h: by_horizon[f"first_{h}"] for h in horizons},
            ridge_lambda=ridge.lam,
            accuracy=accuracy,
        )
    return results


def evaluate(encoders: list[features.Encoder], train_records: str, test_records: str, batch_size: int = 256,
             max_records: int | None = None) -> dict:
    """The whole report for each encoder, keyed by its name."""
    report = {}
    for encoder in encoders:
        train = features.extract(encoder, train_records, batch_size, max_records)
        test = features.extract(encoder, test_records, batch_size, max_records)
        report[encoder.name] = dict(
            probes=probe_features(train, test),
            retrieval=retrieval.retrieval_report(test["image_pooled"], test["action_embedding"]),
            train_records=len(train["action"]),
            test_records=len(test["action"]),
        )
        logging.info("%s: %s", encoder.name, json.dumps(report[encoder.name]["retrieval"]))
    return report


def markdown(report: dict) -> str:
    """Two Markdown tables: probes (a row per model and feature kind) and retrieval."""
    labels = sorted({label for row in report.values() for kind in row["probes"].values() for label in kind["accuracy"]})
    r2_keys = ("overall", "first_8", "first_32", "first_64")
    lines = ["| model | features | " + " | ".join(f"R² {k.replace('_', ' ')}" for k in r2_keys)
             + "".join(f" | {label} acc." for label in labels) + " |"]
    lines.append("|---" * (2 + len(r2_keys) + len(labels)) + "|")
    for name, row in report.items():
        for kind, result in row["probes"].items():
            cells = [f"{result['action_r2'][k]:.3f}" if k in result["action_r2"] else "" for k in r2_keys]
            cells += [f"{result['accuracy'][label]:.3f}" if label in result["accuracy"] else "" for label in labels]
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    keys = list(next(iter(report.values()))["retrieval"])
    lines += ["", "| model | " + " | ".join(k.replace("image_text", "image+text").replace("_to_", " → ") for k in keys) + " |",
              "|---" * (1 + len(keys)) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row['retrieval'][k]:.3f}" for k in keys) + " |" for name, row in report.items()]
    return "\n".join(lines) + "\n"


def write(report: dict, out: str, title: str) -> None:
    """report.json, report.md and r2_by_horizon.png (image_pooled features, a line per model)."""
    storage.write_text(storage.join(out, "report.json"), json.dumps(report, indent=2))
    storage.write_text(storage.join(out, "report.md"), f"# {title}\n\n" + markdown(report))
    rows = {name: row["probes"]["image_pooled"]["r2_by_horizon"] for name, row in report.items()}
    plot.plot_r2_by_horizon(rows, storage.join(out, "r2_by_horizon.png"), f"{title}: action R² (image_pooled)")
