"""Curvature scoring, memorization (estimate and import), LiRA, and the link statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dpledger import warehouse
from dpledger.analysis import correlations as L
from conftest import query_rows as _q, table_snapshot




def _constructed_study(db, correct: dict, phi: dict, members: dict):
    """Runs r0..rn of one subset study with given final correctness / confidence logits."""
    con = warehouse.connect(db)
    for run in members:
        con.execute("INSERT INTO runs (run_id, dataset, model, private, epochs, config) VALUES "
                    "(?, 'toy', 'logreg', false, 1, ?)", [run, json.dumps({"train": {"subset_ratio": 0.5}})])
        for p, inside in members[run].items():
            con.execute("INSERT INTO membership VALUES (?, ?, ?)", [run, p, inside])
            con.execute("INSERT INTO evaluations (run_id, step, point_id, correct, confidence_logit) VALUES "
                        "(?, 9, ?, ?, ?)", [run, p, correct[run][p], phi[run][p]])
            # an earlier evaluation that must be ignored (not the final one)
            con.execute("INSERT INTO evaluations (run_id, step, point_id, correct, confidence_logit) VALUES "
                        "(?, 3, ?, ?, ?)", [run, p, not correct[run][p], -50.0])
    con.close()


def test_memorization_estimate_on_constructed_runs(db):
    members = {"r0": {0: True, 1: False}, "r1": {0: True, 1: True}, "r2": {0: False, 1: True},
               "r3": {0: False, 1: False}}
    correct = {"r0": {0: True, 1: False}, "r1": {0: True, 1: True}, "r2": {0: False, 1: True},
               "r3": {0: True, 1: True}}
    phi = {r: {0: 0.0, 1: 0.0} for r in members}
    _constructed_study(db, correct, phi, members)
    got = _q(db, "SELECT point_id, memorization, p_correct_in, p_correct_out, n_in, n_out FROM memorization_estimate "
                 "ORDER BY point_id")
    # point 0: in r0, r1 (both correct) -> 1; out r2 (wrong), r3 (right) -> 0.5: mem 0.5
    # point 1: in r1, r2 (right, right) -> 1; out r0 (wrong), r3 (right) -> 0.5: mem 0.5
    assert got == [(0, 0.5, 1.0, 0.5, 2, 2), (1, 0.5, 1.0, 0.5, 2, 2)]


def test_lira_scores_match_a_hand_computation(db):
    rng = np.random.default_rng(4)
    runs = [f"r{i}" for i in range(8)]
    members = {r: {0: bool(i % 2), 1: i < 4} for i, r in enumerate(runs)}
    phi = {r: {p: float(rng.normal(2.0 if members[r][p] else -1.0, 0.7)) for p in (0, 1)} for r in runs}
    correct = {r: {p: True for p in (0, 1)} for r in runs}
    _constructed_study(db, correct, phi, members)
    got = {(r, p): (on, off) for r, p, on, off in _q(db, "SELECT run_id, point_id, online_score, offline_score "
                                                        "FROM mia_score")}
    for r in runs:
        for p in (0, 1):
            shadows = [s for s in runs if s != r]
            x_in = np.array([phi[s][p] for s in shadows if members[s][p]])
            x_out = np.array([phi[s][p] for s in shadows if not members[s][p]])
            mu_in, sd_in = x_in.mean(), x_in.std(ddof=1)
            mu_out, sd_out = x_out.mean(), x_out.std(ddof=1)
            x = phi[r][p]
            online = stats.norm.logpdf(x, mu_in, sd_in) - stats.norm.logpdf(x, mu_out, sd_out)
            offline = stats.norm.cdf((x - mu_out) / sd_out)
            assert got[(r, p)][0] == pytest.approx(online, rel=1e-9)
            assert got[(r, p)][1] == pytest.approx(offline, rel=1e-9)
    adv = dict(_q(db, "SELECT point_id, mia_advantage FROM point_mia"))
    assert adv[0] > 0.5 and adv[1] > 0.5  # the constructed statistics separate members well


def test_link_statistics_match_scipy():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"epsilon": rng.gamma(2, 1, 60), "curvature": rng.random(60), "memorization": rng.random(60)})
    df.loc[3, "curvature"] = np.nan
    pairs = L.pair_stats(df, ["epsilon", "curvature", "memorization"], k=10).set_index(["a", "b"])
    for a, b in [("epsilon", "curvature"), ("epsilon", "memorization"), ("curvature", "memorization")]:
        both = df[[a, b]].dropna()
        row = pairs.loc[(a, b)]
        assert row.n == len(both)
        assert row.spearman == pytest.approx(stats.spearmanr(both[a], both[b]).statistic, rel=1e-12)
        assert row.pearson == pytest.approx(stats.pearsonr(both[a], both[b]).statistic, rel=1e-12)
        cos = both[a] @ both[b] / (np.linalg.norm(both[a]) * np.linalg.norm(both[b]))
        assert row.cosine == pytest.approx(cos, rel=1e-12)
        top_a = set(both[a].sort_values(ascending=False).index[:10])
        top_b = set(both[b].sort_values(ascending=False).index[:10])
        assert row.topk_overlap == len(top_a & top_b) / 10 and not row.topk_tied
    res = L.bound_check([0.1, 0.5, 0.9, np.nan], [1.0, 0.5, 2.0, 1.0], delta=0.0)
    # bounds: 1-e^-1 = 0.632 (ok), 1-e^-0.5 = 0.393 (0.5 violates), 1-e^-2 = 0.865 (0.9 violates)
    assert res["n"] == 3 and res["fraction_within_bound"] == pytest.approx(1 / 3)
    assert res["max_excess"] == pytest.approx(0.5 - (1 - math.exp(-0.5)))  # the larger of the two excesses


def test_topk_overlap_with_ties_is_the_expectation_over_tie_breaks():
    """30 points tie at the top of ε (clipped at every step); the 10 highest curvatures are
    points 20..29, all among them. Breaking ties by position took points 0..9 and said 0."""
    eps = np.r_[np.full(30, 5.0), np.linspace(1, 4, 30)]
    curv = np.r_[np.arange(30) / 100, np.zeros(30)]
    curv[20:30] += 1.0
    # each of the 10 tied-top points of curvature is in ε's top 10 with probability 10/30
    assert L.topk_overlap(eps, curv, 10) == pytest.approx(10 * (10 / 30) / 10)
    assert L.topk_ties(eps, curv, 10) and not L.topk_ties(curv, curv, 10)
    # by brute force: the mean overlap over many random tie-breaks
    rng = np.random.default_rng(0)
    top_b = set(np.argsort(-curv, kind="stable")[:10])
    draws = [len(set(rng.permutation(30)[:10]) & top_b) / 10 for _ in range(4000)]
    assert np.mean(draws) == pytest.approx(L.topk_overlap(eps, curv, 10), abs=0.01)
    pairs = L.pair_stats(pd.DataFrame({"epsilon": eps, "curvature": curv}), ["epsilon", "curvature"], k=10)
    assert pairs.topk_tied.tolist() == [True] and pairs.topk_overlap.tolist() == [pytest.approx(1 / 3)]


@pytest.fixture(scope="module")
def study_db(tmp_path_factory):
    """A small real subset study on digits: 8 DP-SGD runs, half the points each."""
    from dpledger.cli import main

    d = tmp_path_factory.mktemp("study")
    config = d / "study.toml"
    config.write_text('[base]\ndataset = "digits"\nmodel = "logreg"\nepochs = 6\nn_train = 240\nn_test = 100\n'
                      'batch_size = 24\ntrack = "all"\nsubset_ratio = 0.5\nlr = 0.5\nnoise_multiplier = 0.3\n'
                      'max_grad_norm = 3.0\n[grid]\nseed = [0, 1, 2, 3, 4, 5, 6, 7]\n')
    db = d / "w.duckdb"
    assert main(["sweep", str(config), "--db", str(db)]) == 0
    assert main(["account", "--db", str(db)]) == 0
    return db


def test_hard_points_are_memorized_more(study_db):
    (hard, easy, n_hard) = _q(study_db, "SELECT avg(memorization) FILTER (WHERE p_correct_out < 0.5), "
                                        "avg(memorization) FILTER (WHERE p_correct_out >= 0.5), "
                                        "count(*) FILTER (WHERE p_correct_out < 0.5) FROM memorization_estimate "
                                        "WHERE n_in > 0 AND n_out > 0")[0]
    assert n_hard >= 5
    assert hard > easy + 0.2


def test_curvature_scoring_and_links(study_db, tmp_path, cli):
    r = cli("curvature", "--run", "s0", "--probes", "4", "--db", study_db, "--json")
    assert r.rc == 0, r
    out = r.json()
    n_ckpt = len(out["checkpoints"])
    assert n_ckpt >= 2 and out["points"] == 240
    assert _q(study_db, "SELECT count(*) FROM curvature WHERE run_id = 's0'") == [(240 * n_ckpt,)]
    assert _q(study_db, "SELECT min(n_checkpoints), max(n_checkpoints) FROM point_curvature WHERE run_id='s0'") == [
        (n_ckpt, n_ckpt)]
    # one point against input_curvature called directly on the last checkpoint
    import torch

    from dpledger.models.curvature import input_curvature
    from dpledger.models.datasets import load_dataset
    from dpledger.models.nets import build_model

    step, path = _q(study_db, "SELECT step, path FROM checkpoints WHERE run_id = 's0' ORDER BY step DESC LIMIT 1")[0]
    ds = load_dataset("digits", n_train=240, n_test=100)
    model = build_model("logreg", ds.input_shape, ds.num_classes)
    model.load_state_dict(torch.load(path))
    direct = input_curvature(model, ds.x_train[7:8], ds.y_train[7:8], n_probes=4, h=1e-3, seed=0)
    stored = _q(study_db, "SELECT curvature, score FROM curvature WHERE run_id='s0' AND step=? AND point_id=7", [step])
    # float32 finite differences divided by h = 1e-3 amplify summation-order noise to ~1e-4
    assert stored[0][0] == pytest.approx(direct.trace.item(), rel=1e-3)
    assert stored[0][1] == pytest.approx(direct.score.item(), rel=1e-3)
    # scoring again replaces, does not duplicate
    assert cli("curvature", "--run", "s0", "--probes", "4", "--checkpoints", "last", "--db", study_db).rc == 0
    assert _q(study_db, "SELECT count(*) FROM curvature WHERE run_id = 's0'") == [(240 * n_ckpt,)]

    r = cli("links", "--run", "s0", "--by", "label", "--db", study_db, "--json")
    assert r.rc == 0, r
    res = r.json()
    assert set(res["scores"]) >= {"epsilon", "curvature", "memorization", "mia_advantage", "cumulative_loss"}
    pair = next(p for p in res["pairs"] if p["a"] == "epsilon" and p["b"] == "curvature")
    pts = pd.DataFrame(res["points"])
    assert pair["n"] == len(pts) and pair["spearman"] == pytest.approx(
        stats.spearmanr(pts.epsilon, pts.curvature).statistic, rel=1e-9)
    assert res["bound"][0]["run_id"] == "s0" and 0 <= res["bound"][0]["fraction_within_bound"] <= 1
    assert {g["group"] for g in res["groups"]} == {str(i) for i in range(10)}
    table = cli("links", "--config", _q(study_db, "SELECT study_key FROM run_study LIMIT 1")[0][0], "--db", study_db)
    assert table.rc == 0 and "correlations and top-10 overlap" in table.out


def test_memorization_import(db, tmp_path, cli):
    rng = np.random.default_rng(1)
    mem = rng.random(50)
    labels = rng.integers(0, 10, 50)
    f = tmp_path / "cifar100_infl_matrix.npz"
    np.savez(f, tr_mem=mem, tr_labels=labels, tt_labels=labels[:5])
    r = cli("ingest", "memorization", f, "--dataset", "toy", "--db", db)
    assert r.rc == 0, r
    assert "file's own order" in r.out
    got = _q(db, "SELECT point_id, score FROM memorization ORDER BY point_id")
    np.testing.assert_array_equal([g[1] for g in got], mem)
    before = table_snapshot(db)
    assert "skipped" in cli("ingest", "memorization", f, "--dataset", "toy", "--db", db).out
    assert table_snapshot(db) == before
    # labels are checked against points when the dataset has them: a shuffled order is refused
    con = warehouse.connect(db)
    con.execute("INSERT INTO points (dataset, point_id, label) SELECT 'other', range, (range * 7) % 10 FROM range(50)")
    con.close()
    r = cli("ingest", "memorization", f, "--dataset", "other", "--db", db)
    assert r.rc == 2 and "give --index" in r.err
    ids = tmp_path / "ids.txt"
    perm = rng.permutation(50)
    ids.write_text("\n".join(str(i) for i in perm))
    np.savez(f, tr_mem=mem, tr_labels=(perm * 7) % 10)
    r = cli("ingest", "memorization", f, "--dataset", "other", "--index", ids, "--db", db)
    assert r.rc == 0, r
    got = dict(_q(db, "SELECT point_id, score FROM memorization WHERE dataset = 'other'"))
    assert all(got[int(p)] == pytest.approx(m) for p, m in zip(perm, mem))
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=mem)
    r = cli("ingest", "memorization", bad, "--dataset", "toy", "--db", db)
    assert r.rc == 2 and "no array 'tr_mem'" in r.err


@pytest.mark.parametrize("args,fragment", [
    (["links"], "give --run RUN"),
    (["links", "--run", "nope"], "unknown run 'nope'"),
    (["curvature", "--run", "nope"], "unknown run 'nope'"),
    (["links", "--config", "nothing"], "no runs with that"),
])
def test_links_bad_input(db, cli, args, fragment):
    warehouse.init(db)
    r = cli(*args, "--db", db)
    assert r.rc == 2 and fragment in r.err, r
