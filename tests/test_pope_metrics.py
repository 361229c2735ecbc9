"""POPE metrics (hand-computed confusion matrices) and the clustered bootstrap of core/stats.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.stats import block_columns, cluster_bootstrap, factorize
from tasks.base import Response, Sample
from tasks.pope import METRICS, POPETask
from tasks.yesno import PARSERS


def task(**kw) -> POPETask:
    return POPETask(questions="unused.json", **kw)


def record(split: str, i: int, image: str, target: str, output: str) -> dict:
    return {
        "sample_id": f"{split}/{i}",
        "split": split,
        "index": i,
        "image_id": image,
        "target": target,
        "raw_output": output,
        "parsed": None,
        "clean": None,
        "correct": None,
    }


def confusion_records() -> list[dict]:
    """Split ``random``: 12 questions on 6 images; split ``popular``: 4 all-correct questions."""
    rows = [
        ("yes", "yes"),  # lmms TP, official TP
        ("yes", "yes"),
        ("yes", "yes"),
        ("yes", "yes"),
        ("yes", "no"),  # FN / FN
        ("yes", "Yes."),  # lmms None -> FN + unknown; official TP
        ("no", "no"),  # TN / TN
        ("no", "no"),
        ("no", "no"),
        ("no", "yes"),  # FP / FP
        ("no", "yes"),
        ("no", "maybe"),  # lmms None -> wrong, unknown; official FP; unclean
    ]
    recs = [record("random", i, f"img{i // 2}", t, o) for i, (t, o) in enumerate(rows)]
    pop = [("yes", "yes"), ("no", "no"), ("yes", "Yes"), ("no", "No")]
    recs += [record("popular", 12 + i, f"img{i}", t, o) for i, (t, o) in enumerate(pop)]
    return recs


def test_metrics_against_hand_confusion_matrix():
    res = task(parser="lmms_exact", extra_parsers=["pope_official"], n_boot=50).aggregate(confusion_records())
    assert list(res) == ["pope_random", "pope_popular", "pope"]

    rnd = res["pope_random"]
    assert rnd["sample_len"] == 12 and rnd["alias"] == "pope_random"
    # lmms_exact: TP=4, FP=2, TN=3, FN=2 (one of them undecided), unknown=2, n=12
    assert rnd["accuracy,lmms_exact"] == pytest.approx(7 / 12)
    assert rnd["precision,lmms_exact"] == pytest.approx(4 / 6)
    assert rnd["recall,lmms_exact"] == pytest.approx(4 / 6)
    assert rnd["f1,lmms_exact"] == pytest.approx(2 / 3)
    assert rnd["yes_ratio,lmms_exact"] == pytest.approx(6 / 12)
    assert rnd["unknown_rate,lmms_exact"] == pytest.approx(2 / 12)
    # pope_official: TP=5, FP=3, TN=3, FN=1
    assert rnd["accuracy,pope_official"] == pytest.approx(8 / 12)
    assert rnd["precision,pope_official"] == pytest.approx(5 / 8)
    assert rnd["recall,pope_official"] == pytest.approx(5 / 6)
    assert rnd["f1,pope_official"] == pytest.approx(5 / 7)
    assert rnd["yes_ratio,pope_official"] == pytest.approx(8 / 12)
    assert rnd["unknown_rate,pope_official"] == 0.0
    assert rnd["unclean_rate,none"] == pytest.approx(1 / 12)  # only "maybe"; "Yes." is clean

    pop = res["pope_popular"]
    assert pop["sample_len"] == 4
    assert pop["accuracy,lmms_exact"] == 1.0 and pop["f1,pope_official"] == 1.0
    assert pop["yes_ratio,lmms_exact"] == 0.5

    mean = res["pope"]
    assert mean["sample_len"] == 16
    assert mean["accuracy,lmms_exact"] == pytest.approx((7 / 12 + 1) / 2)
    assert mean["f1,pope_official"] == pytest.approx((5 / 7 + 1) / 2)
    assert mean["unclean_rate,none"] == pytest.approx((1 / 12 + 0) / 2)


def test_key_layout():
    res = task(parser="pope_official", extra_parsers=["opera"], n_boot=20).aggregate(confusion_records())
    expected = {"alias", "sample_len", "unclean_rate,none", "unclean_rate_stderr,none"}
    for parser in ("pope_official", "opera"):
        for metric in METRICS:
            expected |= {f"{metric},{parser}", f"{metric}_stderr,{parser}"}
    for row in res.values():
        assert set(row) == expected
    assert set(POPETask.higher_is_better) == {*METRICS, "unclean_rate"}


def test_yes_ratio_counts_predictions_not_labels():
    recs = [record("random", i, f"img{i}", "yes", "No") for i in range(10)]
    row = task(parser="pope_official", n_boot=0).aggregate(recs)["pope_random"]
    assert row["yes_ratio,pope_official"] == 0.0  # labels would give 1.0
    # Nothing predicted yes: precision 0 by convention; recall 0; F1 0.
    assert row["precision,pope_official"] == 0.0
    assert row["recall,pope_official"] == 0.0
    assert row["f1,pope_official"] == 0.0
    assert row["accuracy_stderr,pope_official"] is None  # n_boot = 0


def test_split_order_follows_config_and_error_records_skipped():
    recs = [*confusion_records()[::-1], {**record("random", 99, "x", "yes", "yes"), "error": "boom"}]
    res = task(splits=["random", "popular"], n_boot=0).aggregate(recs)
    assert list(res) == ["pope_random", "pope_popular", "pope"]
    assert res["pope_random"]["sample_len"] == 12


def test_score_fields_and_every_parsers_verdict():
    t = task(parser="lmms_exact")
    s = Sample(sample_id="random/1", split="random", index=0, image_id="a", text="q", target="yes", source="f:1")

    def score(task_, text):
        return task_.score(s, Response(raw_output=text, prompt="p"))

    out = score(t, "Yes.")
    assert {k: out[k] for k in ("parsed", "clean", "correct")} == {"parsed": None, "clean": True, "correct": False}
    # every registered parser's reading is stored, so the samples file shows where they disagree
    assert out["verdicts"] == {name: PARSERS.get(name)("Yes.", "yes") for name in PARSERS.names()}
    assert out["verdicts"]["pope_official"] == "yes" and out["verdicts"]["lmms_exact"] is None
    assert {k: score(t, " yes ")[k] for k in ("parsed", "correct")} == {"parsed": "yes", "correct": True}
    t2 = task(parser="pope_official")
    out = score(t2, "No, there is not.")
    assert (out["parsed"], out["clean"], out["correct"]) == ("no", False, False)


def test_gen_kwargs_merged_over_defaults():
    assert task().gen_kwargs == {"max_new_tokens": 128, "do_sample": False}
    assert task(gen_kwargs={"max_new_tokens": 8}).gen_kwargs == {"max_new_tokens": 8, "do_sample": False}


# ----------------------------------------------------------------------------- bootstrap


def accuracy_stat(sums: np.ndarray) -> np.ndarray:
    return sums[..., 1:2] / sums[..., 0:1]  # [..., 1]


def counts_of(correct) -> np.ndarray:
    correct = np.asarray(correct, dtype=float)
    return np.stack([np.ones_like(correct), correct], axis=1)  # [n, 2]


def test_bootstrap_is_deterministic_given_seed():
    rng = np.random.default_rng(1)
    correct = rng.random(200) < 0.7
    ids = [f"img{i // 3}" for i in range(200)]
    a = cluster_bootstrap(ids, counts_of(correct), accuracy_stat, n_boot=300, seed=5)
    b = cluster_bootstrap(ids, counts_of(correct), accuracy_stat, n_boot=300, seed=5)
    c = cluster_bootstrap(ids, counts_of(correct), accuracy_stat, n_boot=300, seed=6)
    np.testing.assert_array_equal(a.draws, b.draws)
    assert a.stderr[0] == b.stderr[0]
    assert a.stderr[0] != c.stderr[0]
    assert a.estimate[0] == pytest.approx(correct.mean())
    assert a.n_clusters == 67


def test_bootstrap_se_zero_when_clusters_identical():
    correct = [1, 0] * 50  # every image: one right, one wrong
    ids = [f"img{i // 2}" for i in range(100)]
    res = cluster_bootstrap(ids, counts_of(correct), accuracy_stat, n_boot=200, seed=0)
    assert res.estimate[0] == 0.5
    assert res.stderr[0] < 1e-12


def test_bootstrap_matches_binomial_se_with_one_question_per_image():
    n, p = 2000, 0.8
    correct = np.arange(n) < int(p * n)
    res = cluster_bootstrap(np.arange(n), counts_of(correct), accuracy_stat, n_boot=1000, seed=0)
    analytic = math.sqrt(p * (1 - p) / n)
    assert res.stderr[0] == pytest.approx(analytic, rel=0.15)


def test_task_accuracy_se_matches_binomial():
    n = 1000
    recs = [record("random", i, f"img{i}", "yes", "yes" if i % 4 else "no") for i in range(n)]  # 75% correct
    row = task(n_boot=1000).aggregate(recs, seed=3)["pope_random"]
    assert row["accuracy,pope_official"] == 0.75
    assert row["accuracy_stderr,pope_official"] == pytest.approx(math.sqrt(0.75 * 0.25 / n), rel=0.15)


def test_clustering_inflates_se_for_duplicated_questions():
    rng = np.random.default_rng(0)
    per_image = rng.random(300) < 0.7
    k = 4
    correct = np.repeat(per_image, k)  # each image's question asked k times, same answer
    clustered = cluster_bootstrap(np.repeat(np.arange(300), k), counts_of(correct), accuracy_stat, seed=0)
    naive = cluster_bootstrap(np.arange(300 * k), counts_of(correct), accuracy_stat, seed=0)
    assert clustered.stderr[0] > 1.6 * naive.stderr[0]  # ≈ sqrt(k) = 2 times larger


def test_joint_bootstrap_over_splits_shares_draws():
    rng = np.random.default_rng(2)
    a = rng.random(150) < 0.6
    ids = np.tile(np.arange(150), 2)
    split = np.repeat([0, 1], 150)

    def stat(sums):  # [..., 2 splits * 2 cols] -> [..., 3]: acc split 0, acc split 1, mean
        s = sums.reshape(*sums.shape[:-1], 2, 2)
        acc = s[..., 1] / s[..., 0]
        return np.concatenate([acc, acc.mean(axis=-1, keepdims=True)], axis=-1)

    same = cluster_bootstrap(ids, block_columns(counts_of(np.concatenate([a, a])), split, 2), stat, seed=0)
    assert same.stderr[2] == pytest.approx(same.stderr[0])  # identical splits: mean moves with each split
    assert same.stderr[0] == pytest.approx(same.stderr[1])
    flipped = cluster_bootstrap(ids, block_columns(counts_of(np.concatenate([a, ~a])), split, 2), stat, seed=0)
    assert flipped.stderr[2] < 1e-12  # complementary splits: the mean is 0.5 in every joint draw
    assert flipped.stderr[0] > 0.02


def test_task_mean_se_uses_joint_draws():
    recs = []
    for i in range(200):
        out = "yes" if i % 3 else "no"
        recs.append(record("random", i, f"img{i}", "yes", out))
        recs.append(record("popular", 200 + i, f"img{i}", "yes", "no" if out == "yes" else "yes"))
    res = task(n_boot=300).aggregate(recs)
    assert res["pope"]["accuracy,pope_official"] == pytest.approx(0.5)
    assert res["pope"]["accuracy_stderr,pope_official"] < 1e-12
    assert res["pope_random"]["accuracy_stderr,pope_official"] > 0.01


def test_factorize_and_undefined_draws():
    idx, n = factorize(["b", "a", "b", "c"])
    assert n == 3 and idx.tolist() == [0, 1, 0, 2]

    # a statistic that is NaN in some draws: those draws are left out, the SE stays finite
    def log_excess(sums):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.log(sums[..., 1:2] - 1)  # undefined when fewer than 2 correct in the draw

    res = cluster_bootstrap(["a", "b", "c"], counts_of([1, 0, 1]), log_excess, n_boot=200)
    assert np.isnan(res.draws).any() and np.isfinite(res.stderr[0])


def test_single_cluster_has_no_standard_error():
    res = cluster_bootstrap(["img"] * 5, counts_of([1, 0, 1, 1, 0]), accuracy_stat, n_boot=50)
    assert res.estimate[0] == pytest.approx(0.6) and np.isnan(res.stderr[0])
