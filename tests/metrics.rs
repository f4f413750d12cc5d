//! Tests of `mgkd::metrics`: hand-derived small cases (with ties), invariances, brute-force
//! cross-checks on random small inputs (DeLong's paired comparison among them), agreement with scikit-learn on the committed fixture
//! `tests/fixtures/metrics_sklearn.json` (made by `tools/make_metrics_fixture.py`), and the
//! speed of `auc` on a million scores.

use mgkd::metrics::{
    approval_bad_rates, auc, decile_lift, evaluate, ks, ks_curve, log_loss, log_loss_from_logits,
    paired_auc, pr_auc, roc_curve, APPROVAL_RATES_PCT,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

// ---------------------------------------------------------------------------------------
// Hand-derived cases
// ---------------------------------------------------------------------------------------

#[test]
fn all_scores_tied() {
    // One tie group holding both classes: every (pos, neg) pair is a tie, counted ½, so
    // AUC = ½. The only thresholds are +∞ (tpr = fpr = 0) and 0.4 (tpr = fpr = 1): KS = 0.
    // AP: one step from recall 0 to 1 at precision P/n = 2/5.
    let s = [0.4; 5];
    let y = [1, 0, 0, 1, 0];
    assert_eq!(auc(&s, &y).unwrap(), 0.5);
    assert_eq!(ks(&s, &y).unwrap(), 0.0);
    assert!(close(pr_auc(&s, &y).unwrap(), 0.4, 1e-15));
}

#[test]
fn perfect_and_reversed_separation() {
    // Positives above every negative: every pair won, AUC = 1; at threshold 0.8 tpr = 1,
    // fpr = 0, KS = 1; precision is 1 at both positive steps, AP = 1.
    let s = [0.1, 0.2, 0.8, 0.9];
    assert_eq!(auc(&s, &[0, 0, 1, 1]).unwrap(), 1.0);
    assert_eq!(ks(&s, &[0, 0, 1, 1]).unwrap(), 1.0);
    assert_eq!(pr_auc(&s, &[0, 0, 1, 1]).unwrap(), 1.0);
    // Reversed: every pair lost, AUC = 0; at threshold 0.8 tpr = 0, fpr = 1, |·| = 1.
    // AP: positives enter at ranks 3 and 4, precisions 1/3 and 2/4: (1/3 + 1/2) / 2 = 5/12.
    assert_eq!(auc(&s, &[1, 1, 0, 0]).unwrap(), 0.0);
    assert_eq!(ks(&s, &[1, 1, 0, 0]).unwrap(), 1.0);
    assert!(close(pr_auc(&s, &[1, 1, 0, 0]).unwrap(), 5.0 / 12.0, 1e-15));
}

/// Six rows, input order shuffled, one tie (0.5) across the classes.
/// Positives: 0.9, 0.5, 0.3; negatives: 0.7, 0.5, 0.1 (P = N = 3, 9 pairs).
fn six() -> ([f64; 6], [u8; 6]) {
    ([0.5, 0.1, 0.9, 0.3, 0.5, 0.7], [1, 0, 1, 1, 0, 0])
}

#[test]
fn six_rows_with_a_tie_across_classes() {
    let (s, y) = six();
    // Pairs won: 0.9 beats all three negatives (3); 0.5 beats 0.1 and ties 0.5 (1 + ½);
    // 0.3 beats 0.1 (1). U = 5.5, AUC = 5.5 / 9 = 11/18.
    assert!(close(auc(&s, &y).unwrap(), 11.0 / 18.0, 1e-15));
    // Thresholds (tp, fp): 0.9 (1,0) → 1/3; 0.7 (1,1) → 0; 0.5 (2,2) → 0; 0.3 (3,2) → 1/3;
    // 0.1 (3,3) → 0. KS = 1/3, first reached at 0.9.
    assert!(close(ks(&s, &y).unwrap(), 1.0 / 3.0, 1e-15));
    let kc = ks_curve(&s, &y).unwrap();
    assert_eq!(kc.ks_threshold, 0.9);
    assert_eq!(
        kc.flagged_share,
        vec![0.0, 1.0 / 6.0, 2.0 / 6.0, 4.0 / 6.0, 5.0 / 6.0, 1.0]
    );
    // AP: positive steps at 0.9 (precision 1/1), 0.5 (2/4), 0.3 (3/5): (1 + .5 + .6) / 3 = .7.
    assert!(close(pr_auc(&s, &y).unwrap(), 0.7, 1e-15));
    // ROC points (sklearn, drop_intermediate=False): thresholds inf, .9, .7, .5, .3, .1.
    let roc = roc_curve(&s, &y).unwrap();
    assert_eq!(roc.thresholds, vec![f64::INFINITY, 0.9, 0.7, 0.5, 0.3, 0.1]);
    assert_eq!(
        roc.tpr,
        vec![0.0, 1.0 / 3.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 1.0]
    );
    assert_eq!(
        roc.fpr,
        vec![0.0, 0.0, 1.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0, 1.0]
    );
    assert_eq!(kc.tpr, roc.tpr);
    assert_eq!(kc.fpr, roc.fpr);
}

#[test]
fn negative_zero_ties_with_zero() {
    // -0.0 and 0.0 are the same score: the positive ties the negative, AUC = ½.
    assert_eq!(auc(&[-0.0, 0.0], &[1, 0]).unwrap(), 0.5);
    assert_eq!(auc(&[0.0, -0.0], &[1, 0]).unwrap(), 0.5);
}

#[test]
fn approval_table_breaks_ties_by_input_order() {
    let s = [0.2, 0.1, 0.2, 0.2, 0.9, 0.5, 0.1, 0.3, 0.2, 0.7];
    let y = [0, 1, 1, 1, 1, 0, 0, 1, 0, 1];
    // Ascending score, ties by input index: 0.1 → rows 1, 6; 0.2 → rows 0, 2, 3, 8; then 7,
    // 5, 9, 4. Their labels: 1 0 | 0 1 1 0 | 1 0 1 1. With n = 10, rate r% approves r/10 rows;
    // bad counts of the prefixes: 1 1 1 2 3 3 4 4 5. At 30 % the third row is row 0 (good),
    // not row 2 (bad): bad rate 1/3, not 2/3.
    let t = approval_bad_rates(&s, &y, &APPROVAL_RATES_PCT).unwrap();
    let bad: Vec<u64> = t.iter().map(|p| p.bad).collect();
    assert_eq!(bad, vec![1, 1, 1, 2, 3, 3, 4, 4, 5]);
    let approved: Vec<usize> = t.iter().map(|p| p.approved).collect();
    assert_eq!(approved, (1..=9).collect::<Vec<_>>());
    assert_eq!(t[2].bad_rate, Some(1.0 / 3.0));
    assert_eq!(t[6].bad_rate, Some(4.0 / 7.0));
    let cuts: Vec<f64> = t.iter().map(|p| p.cut_score.unwrap()).collect();
    assert_eq!(cuts, vec![0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.3, 0.5, 0.7]);
    assert_eq!(t[4].rate, 0.5);
}

#[test]
fn approval_counts_round_half_up() {
    // n = 5: 10 % → 0.5 → 1 row; 30 % → 1.5 → 2; 50 % → 2.5 → 3; 70 % → 3.5 → 4; 100 % → 5.
    let s = [0.1, 0.2, 0.3, 0.4, 0.5];
    let y = [0, 1, 0, 1, 1];
    let t = approval_bad_rates(&s, &y, &[10, 30, 50, 70, 100]).unwrap();
    let approved: Vec<usize> = t.iter().map(|p| p.approved).collect();
    assert_eq!(approved, vec![1, 2, 3, 4, 5]);
    assert_eq!(t[4].bad_rate, Some(3.0 / 5.0));
    // n = 4 at 10 %: 0.4 → 0 rows approved, no bad rate.
    let t = approval_bad_rates(&[0.1, 0.2, 0.3, 0.4], &[0, 1, 0, 1], &[10]).unwrap();
    assert_eq!(
        (t[0].approved, t[0].bad_rate, t[0].cut_score),
        (0, None, None)
    );
    assert!(approval_bad_rates(&s, &y, &[0]).is_err());
    assert!(approval_bad_rates(&s, &y, &[101]).is_err());
}

#[test]
fn decile_lift_by_hand() {
    // Scores 0.00, 0.05, …, 0.95 given in ascending order; defaulters at 0.95, 0.90, 0.85,
    // 0.70, 0.45 (P = 5 of 20, overall rate 0.25). Two rows per bin, highest scores first:
    // bin 1 {.95,.90}: 2 bad, rate 1, lift 4, capture .4; bin 2 {.85,.80}: 1, .5, lift 2, .6;
    // bin 3 {.75,.70}: 1, .5, 2, .8; bins 4, 5: 0; bin 6 {.45,.40}: 1, .5, 2, 1.0; rest 0.
    let s: Vec<f64> = (0..20).map(|i| i as f64 * 0.05).collect();
    let mut y = [0u8; 20];
    for i in [19, 18, 17, 14, 9] {
        y[i] = 1;
    }
    let t = decile_lift(&s, &y).unwrap();
    assert_eq!(t.len(), 10);
    let pos: Vec<u64> = t.iter().map(|r| r.positives).collect();
    assert_eq!(pos, vec![2, 1, 1, 0, 0, 1, 0, 0, 0, 0]);
    assert!(t.iter().all(|r| r.count == 2));
    let lift: Vec<f64> = t.iter().map(|r| r.lift.unwrap()).collect();
    assert_eq!(lift, vec![4.0, 2.0, 2.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
    let cap: Vec<f64> = t.iter().map(|r| r.cum_capture).collect();
    assert_eq!(cap, vec![0.4, 0.6, 0.8, 0.8, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0]);
    assert_eq!((t[0].max_score, t[0].min_score), (Some(s[19]), Some(s[18])));
    assert_eq!(t[9].min_score, Some(0.0));
}

#[test]
fn decile_lift_splits_ties_by_input_order_and_allows_empty_bins() {
    // Ten tied rows: one per bin, in input order, so bin b holds row b.
    let y = [0, 1, 1, 0, 0, 0, 1, 0, 0, 0];
    let t = decile_lift(&[0.3; 10], &y).unwrap();
    let pos: Vec<u64> = t.iter().map(|r| r.positives).collect();
    assert_eq!(pos, y.iter().map(|&v| u64::from(v)).collect::<Vec<_>>());
    // Seven rows: bin b holds ranks ⌊7b/10⌋..⌊7(b+1)/10⌋, sizes 0 1 1 0 1 1 0 1 1 1.
    let t = decile_lift(&[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], &[1, 0, 1, 0, 0, 1, 0]).unwrap();
    let counts: Vec<usize> = t.iter().map(|r| r.count).collect();
    assert_eq!(counts, vec![0, 1, 1, 0, 1, 1, 0, 1, 1, 1]);
    assert_eq!(
        (t[0].bad_rate, t[0].lift, t[0].max_score),
        (None, None, None)
    );
    // Bin 2 holds rank 0 (score 0.9, bad): rate 1, lift 1 / (3/7) = 7/3.
    assert_eq!(t[1].bad_rate, Some(1.0));
    assert!(close(t[1].lift.unwrap(), 7.0 / 3.0, 1e-15));
    assert_eq!(t[9].cum_capture, 1.0);
}

#[test]
fn log_loss_by_hand_and_clipping() {
    // p = ½ on either class costs ln 2.
    assert!(close(
        log_loss(&[0.5, 0.5], &[1, 0]).unwrap(),
        2f64.ln(),
        1e-15
    ));
    let want = -(0.8f64.ln() + 0.9f64.ln()) / 2.0;
    assert!(close(log_loss(&[0.8, 0.1], &[1, 0]).unwrap(), want, 1e-15));
    // A certain mistake is clipped at ε = 2^-52 (float64 epsilon): cost −ln 2^-52 = 52 ln 2
    // ≈ 36.04 (scikit-learn < 1.5, with eps = 1e-15, gave 34.54).
    let cap = 52.0 * 2f64.ln();
    assert!(close(log_loss(&[0.0], &[1]).unwrap(), cap, 1e-12));
    assert!(close(log_loss(&[1.0], &[0]).unwrap(), cap, 1e-12));
    // A certain hit costs −ln(1 − ε) ≈ ε, not 0.
    let hit = log_loss(&[1.0], &[1]).unwrap();
    assert!(hit > 0.0 && hit < 3e-16);
    // A single class is fine for log-loss.
    assert!(log_loss(&[0.2, 0.3], &[0, 0]).is_ok());
}

#[test]
fn log_loss_from_logits_is_exact_softplus() {
    // z = 0 → p = ½ → ln 2.
    assert!(close(
        log_loss_from_logits(&[0.0, 0.0], &[1, 0]).unwrap(),
        2f64.ln(),
        1e-15
    ));
    // Confident mistakes are not clipped: softplus(50) = 50 + ln(1 + e^-50) = 50 (in f64).
    assert_eq!(log_loss_from_logits(&[50.0], &[0]).unwrap(), 50.0);
    assert_eq!(log_loss_from_logits(&[-800.0], &[1]).unwrap(), 800.0);
    assert_eq!(log_loss_from_logits(&[800.0], &[1]).unwrap(), 0.0);
    // For moderate logits it equals the probability form.
    let z: [f64; 6] = [-3.0, -0.7, 0.1, 1.5, 4.0, -2.2];
    let y = [0, 1, 0, 1, 1, 0];
    let p: Vec<f64> = z.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect();
    let a = log_loss_from_logits(&z, &y).unwrap();
    let b = log_loss(&p, &y).unwrap();
    assert!(close(a, b, 1e-13), "{a} vs {b}");
    assert!(log_loss_from_logits(&[f64::INFINITY], &[1]).is_err());
}

// ---------------------------------------------------------------------------------------
// Bad input: errors, never NaN or panics
// ---------------------------------------------------------------------------------------

#[test]
fn bad_input_is_an_error() {
    let msg = |r: mgkd::Result<f64>| r.unwrap_err().to_string();
    assert!(msg(auc(&[0.1, 0.2], &[1, 1])).contains("no negative"));
    assert!(msg(auc(&[0.1, 0.2], &[0, 0])).contains("no positive"));
    assert!(msg(ks(&[0.1, 0.2], &[0, 0])).contains("ks"));
    assert!(msg(auc(&[0.1, 0.2, 0.3], &[0, 1])).contains("length mismatch"));
    assert!(msg(auc(&[], &[])).contains("empty"));
    assert!(msg(auc(&[0.1, f64::NAN], &[0, 1])).contains("scores[1]"));
    assert!(msg(auc(&[f64::NEG_INFINITY, 0.2], &[0, 1])).contains("scores[0]"));
    assert!(msg(auc(&[0.1, 0.2], &[0, 2])).contains("labels[1] = 2"));
    assert!(msg(pr_auc(&[0.1, 0.2], &[1, 1])).contains("pr_auc"));
    assert!(msg(log_loss(&[0.1, 1.5], &[0, 1])).contains("probs[1]"));
    assert!(msg(log_loss(&[-0.1, 0.5], &[0, 1])).contains("probs[0]"));
    assert!(msg(log_loss(&[f64::NAN], &[0])).contains("probs[0]"));
    assert!(msg(log_loss(&[0.5], &[0, 1])).contains("length mismatch"));
    assert!(roc_curve(&[0.1], &[1]).is_err());
    assert!(decile_lift(&[0.1, 0.2], &[1, 1]).is_err());
    assert!(evaluate(&[0.1, 2.0], &[0, 1]).is_err());
    assert!(evaluate(&[0.1, 0.2], &[1, 1]).is_err());
}

// ---------------------------------------------------------------------------------------
// Invariance and brute force
// ---------------------------------------------------------------------------------------

/// Random case: scores drawn from `levels` distinct values (heavy ties when small).
fn random_case(rng: &mut ChaCha8Rng, n: usize, levels: u32) -> (Vec<f64>, Vec<u8>) {
    loop {
        let y: Vec<u8> = (0..n).map(|_| u8::from(rng.gen_bool(0.35))).collect();
        if y.contains(&0) && y.contains(&1) {
            let s = y
                .iter()
                .map(|&l| {
                    let v = rng.gen_range(0..levels) + u32::from(l) * levels / 3;
                    f64::from(v) / f64::from(levels + levels / 3)
                })
                .collect();
            return (s, y);
        }
    }
}

#[test]
fn auc_and_ks_invariant_under_increasing_transforms() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for &(n, levels) in &[(50, 5), (300, 40), (1000, 100_000)] {
        let (s, y) = random_case(&mut rng, n, levels);
        let (a, k) = (auc(&s, &y).unwrap(), ks(&s, &y).unwrap());
        assert!(a > 0.5 && a < 1.0, "{a}");
        let transforms: [fn(f64) -> f64; 3] = [
            |x| x * x * x + x,
            |x| (4.0 * x).exp() - 7.0,
            |x| 1.0 / (1.0 + (-(x - 0.5)).exp()),
        ];
        for f in transforms {
            let t: Vec<f64> = s.iter().map(|&x| f(x)).collect();
            assert_eq!(auc(&t, &y).unwrap(), a);
            assert_eq!(ks(&t, &y).unwrap(), k);
        }
        // A decreasing transform swaps the roles: AUC → 1 − AUC (up to one rounding), KS same.
        let neg: Vec<f64> = s.iter().map(|&x| -x).collect();
        assert!(close(auc(&neg, &y).unwrap(), 1.0 - a, 1e-15));
        assert_eq!(ks(&neg, &y).unwrap(), k);
    }
}

#[test]
fn agrees_with_brute_force_definitions() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for trial in 0..200 {
        let n = rng.gen_range(2..60);
        let levels = if trial % 2 == 0 { 4 } else { 1000 };
        let (s, y) = random_case(&mut rng, n, levels);
        let pos: Vec<f64> = (0..n).filter(|&i| y[i] == 1).map(|i| s[i]).collect();
        let neg: Vec<f64> = (0..n).filter(|&i| y[i] == 0).map(|i| s[i]).collect();
        let (np, nn) = (pos.len() as f64, neg.len() as f64);
        // AUC: pairs won + ½ tied.
        let mut won = 0.0;
        for &a in &pos {
            for &b in &neg {
                won += if a > b {
                    1.0
                } else if a == b {
                    0.5
                } else {
                    0.0
                };
            }
        }
        assert!(close(auc(&s, &y).unwrap(), won / (np * nn), 1e-14));
        // KS and AP: flag rows with score ≥ t for every distinct score t.
        let mut ts = s.clone();
        ts.sort_by(|a, b| b.total_cmp(a));
        ts.dedup();
        let (mut best, mut ap, mut prev_recall) = (0.0f64, 0.0, 0.0);
        for &t in &ts {
            let tp = pos.iter().filter(|&&v| v >= t).count() as f64;
            let fp = neg.iter().filter(|&&v| v >= t).count() as f64;
            best = best.max((tp / np - fp / nn).abs());
            ap += (tp / np - prev_recall) * tp / (tp + fp);
            prev_recall = tp / np;
        }
        assert!(close(ks(&s, &y).unwrap(), best, 1e-14));
        assert!(close(pr_auc(&s, &y).unwrap(), ap, 1e-14));
        // Approval: stable ascending sort by score, prefix of k rows.
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&a, &b| s[a].total_cmp(&s[b]));
        let table = approval_bad_rates(&s, &y, &APPROVAL_RATES_PCT).unwrap();
        for p in &table {
            let k = ((p.rate * n as f64) + 0.5 + 1e-9).floor() as usize;
            assert_eq!(p.approved, k);
            let bad: u64 = idx[..k].iter().map(|&i| u64::from(y[i])).sum();
            assert_eq!(p.bad, bad);
        }
    }
}

// ---------------------------------------------------------------------------------------
// scikit-learn fixture
// ---------------------------------------------------------------------------------------

#[test]
fn agrees_with_scikit_learn_fixture() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metrics_sklearn.json"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(doc["sklearn_version"].as_str().is_some());
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    // Float arrays are stored as strings (Python's repr) and parsed by `str::parse`, which
    // is correctly rounded like Python's: serde_json's default number parser can be one ulp
    // off (it reads 0.9999999999999999 as 1.0), which would merge or split ties.
    let f64s = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().parse::<f64>().unwrap())
            .collect()
    };
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let s = f64s(&case["scores"]);
        let y: Vec<u8> = case["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| u8::try_from(v.as_u64().unwrap()).unwrap())
            .collect();
        assert_eq!(s.len(), case["n"].as_u64().unwrap() as usize);
        let checks = [
            ("roc_auc", auc(&s, &y).unwrap()),
            ("log_loss", log_loss(&s, &y).unwrap()),
            ("average_precision", pr_auc(&s, &y).unwrap()),
            ("ks", ks(&s, &y).unwrap()),
        ];
        for (key, ours) in checks {
            let want = case[key].as_f64().unwrap();
            assert!(
                close(ours, want, 1e-9),
                "{name} {key}: ours {ours} sklearn {want}"
            );
        }
        if let Some(fpr) = case.get("roc_fpr") {
            // Bitwise: both sides divide the same integer counts.
            let roc = roc_curve(&s, &y).unwrap();
            assert_eq!(roc.fpr, f64s(fpr), "{name} fpr");
            assert_eq!(roc.tpr, f64s(&case["roc_tpr"]), "{name} tpr");
            assert_eq!(roc.thresholds[0], f64::INFINITY);
            assert_eq!(
                roc.thresholds[1..],
                f64s(&case["roc_thresholds"]),
                "{name} thr"
            );
        }
        // The report is built from one sort and must repeat the single metrics exactly.
        let r = evaluate(&s, &y).unwrap();
        assert_eq!(r.auc, auc(&s, &y).unwrap());
        assert_eq!(r.ks, ks(&s, &y).unwrap());
        assert_eq!(r.pr_auc, pr_auc(&s, &y).unwrap());
        assert_eq!(r.log_loss, log_loss(&s, &y).unwrap());
        assert_eq!(
            r.approval,
            approval_bad_rates(&s, &y, &APPROVAL_RATES_PCT).unwrap()
        );
        assert_eq!(r.deciles, decile_lift(&s, &y).unwrap());
        assert_eq!(r.positives, case["positives"].as_u64().unwrap());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["auc"].as_f64().unwrap(), r.auc);
        assert_eq!(json["deciles"].as_array().unwrap().len(), 10);
    }
}

// ---------------------------------------------------------------------------------------
// Scale
// ---------------------------------------------------------------------------------------

#[test]
fn auc_on_a_million_scores_is_fast_and_exact() {
    let n = 1_000_000;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // Scores on 1000 levels (heavy ties), bad more likely at high levels.
    let lvl: Vec<u32> = (0..n).map(|_| rng.gen_range(0..1000)).collect();
    let y: Vec<u8> = lvl
        .iter()
        .map(|&l| u8::from(rng.gen_bool(0.05 + 0.3 * f64::from(l) / 1000.0)))
        .collect();
    let s: Vec<f64> = lvl.iter().map(|&l| f64::from(l) / 1000.0).collect();
    // Independent O(n) answer from a histogram: Σ_v pos_v·(neg_below_v + ½·neg_v) / (P·N).
    let (mut pos_at, mut neg_at) = (vec![0u64; 1000], vec![0u64; 1000]);
    for (&l, &c) in lvl.iter().zip(&y) {
        if c == 1 {
            pos_at[l as usize] += 1;
        } else {
            neg_at[l as usize] += 1;
        }
    }
    let (p, q): (u64, u64) = (pos_at.iter().sum(), neg_at.iter().sum());
    let (mut below, mut twice_u) = (0u64, 0u128);
    for v in 0..1000 {
        twice_u += u128::from(pos_at[v]) * u128::from(2 * below + neg_at[v]);
        below += neg_at[v];
    }
    let want = twice_u as f64 / (2 * u128::from(p) * u128::from(q)) as f64;
    assert_eq!(auc(&s, &y).unwrap(), want);

    // Distinct scores (the sort's worst case); speed is measured by benchmarks, not here.
    let c: Vec<f64> = (0..n).map(|i| s[i] + rng.gen::<f64>() * 1e-3).collect();
    let a = auc(&c, &y).unwrap();
    assert!(a > 0.6 && a < 0.8);
}

// ---------------------------------------------------------------------------------------
// Paired AUC comparison (DeLong)
// ---------------------------------------------------------------------------------------

/// DeLong's variance of `AUC_a − AUC_b` by its definition, in O(P·N): the kernel
/// ψ(x, y) = 1, ½, 0 for x >, =, < y; per positive the mean of ψ over the negatives, per
/// negative the mean over the positives; the covariance matrices of those, over each class.
fn delong_brute(a: &[f64], b: &[f64], y: &[u8]) -> (f64, f64, f64) {
    let psi = |x: f64, z: f64| match x.partial_cmp(&z).unwrap() {
        std::cmp::Ordering::Greater => 1.0,
        std::cmp::Ordering::Equal => 0.5,
        std::cmp::Ordering::Less => 0.0,
    };
    let pos: Vec<usize> = (0..y.len()).filter(|&i| y[i] == 1).collect();
    let neg: Vec<usize> = (0..y.len()).filter(|&i| y[i] == 0).collect();
    let comps = |s: &[f64]| {
        let v10: Vec<f64> = pos
            .iter()
            .map(|&i| neg.iter().map(|&j| psi(s[i], s[j])).sum::<f64>() / neg.len() as f64)
            .collect();
        let v01: Vec<f64> = neg
            .iter()
            .map(|&j| pos.iter().map(|&i| psi(s[i], s[j])).sum::<f64>() / pos.len() as f64)
            .collect();
        (v10, v01)
    };
    let ((a10, a01), (b10, b01)) = (comps(a), comps(b));
    let cov = |x: &[f64], z: &[f64]| {
        let (mx, mz) = (
            x.iter().sum::<f64>() / x.len() as f64,
            z.iter().sum::<f64>() / z.len() as f64,
        );
        x.iter()
            .zip(z)
            .map(|(p, q)| (p - mx) * (q - mz))
            .sum::<f64>()
            / (x.len() - 1) as f64
    };
    let (p, n) = (pos.len() as f64, neg.len() as f64);
    let var = (cov(&a10, &a10) + cov(&b10, &b10) - 2.0 * cov(&a10, &b10)) / p
        + (cov(&a01, &a01) + cov(&b01, &b01) - 2.0 * cov(&a01, &b01)) / n;
    let auc_a = a10.iter().sum::<f64>() / p;
    let auc_b = b10.iter().sum::<f64>() / p;
    (auc_a, auc_b, var.sqrt())
}

#[test]
fn paired_auc_matches_delong_by_definition_on_random_tied_inputs() {
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    for case in 0..40 {
        let n = rng.gen_range(6..300);
        let y: Vec<u8> = (0..n)
            .map(|i| u8::from(i % 3 == 0 || rng.gen_bool(0.2)))
            .collect();
        // Coarse scores so that ties within and across classes are frequent; b partly
        // follows a, as two models of the same rows do.
        let a: Vec<f64> = (0..n)
            .map(|i| {
                (f64::from(y[i]) + rng.gen_range(-1.5..1.5f64))
                    .mul_add(4.0, 0.0)
                    .round()
            })
            .collect();
        let b: Vec<f64> = (0..n)
            .map(|i| (0.5 * a[i] + rng.gen_range(-3.0..3.0f64)).round())
            .collect();
        let r = paired_auc(&a, &b, &y).unwrap();
        let (aa, ab, se) = delong_brute(&a, &b, &y);
        assert!(
            close(r.auc_a, aa, 1e-12) && close(r.auc_b, ab, 1e-12),
            "case {case}"
        );
        assert_eq!(r.auc_a, auc(&a, &y).unwrap());
        assert!(close(r.se, se, 1e-12), "case {case}: se {} vs {se}", r.se);
        assert!(se > 0.0);
        assert!(close(r.z, (aa - ab) / se, 1e-9), "case {case}");
        assert!(close(r.ci95[1] - r.ci95[0], 2.0 * 1.959964 * se, 1e-6));
        // Swapping the two scorings negates the difference, keeps the error.
        let s = paired_auc(&b, &a, &y).unwrap();
        assert_eq!((s.diff, s.se, s.p), (-r.diff, r.se, r.p));
    }
}

#[test]
fn paired_auc_p_values_and_invariances() {
    let (a, y) = six();
    // A scoring against itself: nothing to tell apart.
    let r = paired_auc(&a, &a, &y).unwrap();
    assert_eq!((r.diff, r.se, r.z, r.p), (0.0, 0.0, 0.0, 1.0));
    // A strictly increasing transform of either scoring changes nothing.
    let b = [0.3, -1.0, 2.0, 0.1, 0.2, 0.9];
    let r = paired_auc(&a, &b, &y).unwrap();
    let a2: Vec<f64> = a.iter().map(|x| (3.0 * x).exp()).collect();
    assert_eq!(paired_auc(&a2, &b, &y).unwrap(), r);
    // The p-value is the two-sided normal tail of z (the reference is checked at 1.959964,
    // where the tail is 0.05).
    assert!(close(
        normal_two_sided_tail(1.959_963_984_540_054),
        0.05,
        1e-12
    ));
    assert!(r.z.abs() > 0.1);
    assert!(close(r.p, normal_two_sided_tail(r.z), 1e-10));
}

/// `2·(1 − Φ(|z|))` by Simpson's rule on the normal density: a reference independent of the
/// `erfc` that `paired_auc` uses.
fn normal_two_sided_tail(z: f64) -> f64 {
    let z = z.abs();
    let steps = 20_000;
    let h = z / steps as f64;
    let phi = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let mut s = phi(0.0) + phi(z);
    for k in 1..steps {
        s += if k % 2 == 1 { 4.0 } else { 2.0 } * phi(k as f64 * h);
    }
    1.0 - 2.0 * s * h / 3.0
}

#[test]
fn paired_auc_refuses_what_it_cannot_measure() {
    let err = |a: &[f64], b: &[f64], y: &[u8]| paired_auc(a, b, y).unwrap_err().to_string();
    assert!(err(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0], &[1, 0, 0]).contains("at least 2 of each"));
    assert!(err(&[1.0, 2.0], &[1.0, 2.0, 3.0], &[1, 0]).contains("length mismatch"));
    assert!(err(
        &[1.0, 2.0, 3.0, 4.0],
        &[1.0, f64::NAN, 3.0, 4.0],
        &[1, 0, 1, 0]
    )
    .contains("paired_auc (b): scores[1] = NaN is not finite"));
    assert!(err(&[1.0, 2.0], &[1.0, 2.0], &[1, 2]).contains("labels[1] = 2"));
}
