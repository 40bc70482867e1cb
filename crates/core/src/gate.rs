//! The quality gate (§5): a pure comparison of a candidate's metrics with the
//! production model's. Fails closed: anything missing or NaN rejects, with a
//! reason that names the metric.

use serde::{Deserialize, Serialize};

use crate::domain::Metrics;

/// Which way is better for a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Higher,
    Lower,
}

/// Whether all metrics or any one of them must improve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Require {
    #[default]
    All,
    Any,
}

/// What to do when the registry has no production model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirstModelPolicy {
    /// The first model passes (bounds still apply). The seeds' "baseline 0".
    #[default]
    Pass,
    Fail,
}

/// One metric's rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricRule {
    pub name: String,
    pub direction: Direction,
    /// Minimum absolute improvement. Unset: strictly better (`> 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_delta: Option<f64>,
    /// Minimum improvement as a fraction of the baseline (`0.01` = 1 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_relative: Option<f64>,
    /// The candidate must be `>= min` even without a baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// The candidate must be `<= max` even without a baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

impl MetricRule {
    pub fn higher(name: &str) -> Self {
        Self {
            name: name.into(),
            direction: Direction::Higher,
            min_delta: None,
            min_relative: None,
            min: None,
            max: None,
        }
    }
    pub fn lower(name: &str) -> Self {
        Self {
            direction: Direction::Lower,
            ..Self::higher(name)
        }
    }
}

/// A label's gate policy. It can only be constructed valid ([`GatePolicy::new`],
/// or deserialised, which validates the same way), so an embedder cannot
/// build a policy that fails open (a `NaN` bound, no metric at all).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "GatePolicyFields", into = "GatePolicyFields")]
pub struct GatePolicy {
    require: Require,
    metrics: Vec<MetricRule>,
    first_model: FirstModelPolicy,
}

/// The serialised shape of a [`GatePolicy`], validated on the way in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatePolicyFields {
    #[serde(default)]
    require: Require,
    metrics: Vec<MetricRule>,
    #[serde(default)]
    first_model: FirstModelPolicy,
}

impl TryFrom<GatePolicyFields> for GatePolicy {
    type Error = String;
    fn try_from(fields: GatePolicyFields) -> Result<Self, String> {
        Self::new(fields.require, fields.metrics, fields.first_model)
    }
}

impl From<GatePolicy> for GatePolicyFields {
    fn from(policy: GatePolicy) -> Self {
        Self {
            require: policy.require,
            metrics: policy.metrics,
            first_model: policy.first_model,
        }
    }
}

impl GatePolicy {
    /// A policy, or why it could never be evaluated meaningfully: no
    /// metric, an empty name, a non-finite threshold or bound, `min > max`.
    pub fn new(
        require: Require,
        metrics: Vec<MetricRule>,
        first_model: FirstModelPolicy,
    ) -> Result<Self, String> {
        if metrics.is_empty() {
            return Err("gate.metrics must list at least one metric".into());
        }
        for rule in &metrics {
            if rule.name.trim().is_empty() {
                return Err("gate metric name must not be empty".into());
            }
            for (key, value) in [
                ("min_delta", rule.min_delta),
                ("min_relative", rule.min_relative),
                ("min", rule.min),
                ("max", rule.max),
            ] {
                if let Some(v) = value {
                    if !v.is_finite() {
                        return Err(format!("gate metric `{}`: {key} must be finite", rule.name));
                    }
                }
            }
            if let (Some(lo), Some(hi)) = (rule.min, rule.max) {
                if lo > hi {
                    return Err(format!(
                        "gate metric `{}`: min ({lo}) is greater than max ({hi})",
                        rule.name
                    ));
                }
            }
        }
        Ok(Self {
            require,
            metrics,
            first_model,
        })
    }

    /// The seed rule: `dice` and `iou`, both higher, strictly better.
    pub fn seed_default() -> Self {
        Self {
            require: Require::All,
            metrics: vec![MetricRule::higher("dice"), MetricRule::higher("iou")],
            first_model: FirstModelPolicy::Pass,
        }
    }

    pub fn require(&self) -> Require {
        self.require
    }
    pub fn metrics(&self) -> &[MetricRule] {
        &self.metrics
    }
    pub fn first_model(&self) -> FirstModelPolicy {
        self.first_model
    }
}

/// One metric's comparison, kept in the verdict for the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub metric: String,
    pub direction: Direction,
    pub candidate: Option<f64>,
    pub baseline: Option<f64>,
    /// Improvement in the "better" direction (positive = better).
    pub delta: Option<f64>,
    pub passed: bool,
    pub reason: String,
}

/// The gate's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub passed: bool,
    /// No production model existed; change rules were not applied.
    pub first_model: bool,
    /// A human overrode the decision (`--force`); `passed` is then true.
    pub forced: bool,
    pub comparisons: Vec<Comparison>,
    pub reason: String,
}

impl Verdict {
    /// Record a manual override of `self`, keeping the original reason.
    pub fn forced(mut self) -> Self {
        if !self.passed {
            self.reason = format!("forced pass (gate said: {})", self.reason);
        }
        self.passed = true;
        self.forced = true;
        self
    }
}

fn usable(value: Option<f64>) -> Option<f64> {
    value.filter(|v| v.is_finite())
}

fn compare(rule: &MetricRule, candidate: Option<f64>, baseline: Option<&Metrics>) -> Comparison {
    let raw_candidate = candidate;
    let raw_baseline = baseline.and_then(|b| b.get(&rule.name).copied());
    let mut comparison = Comparison {
        metric: rule.name.clone(),
        direction: rule.direction,
        // Non-finite values are named in the reason; JSON has no NaN.
        candidate: raw_candidate.filter(|v| v.is_finite()),
        baseline: raw_baseline.filter(|v| v.is_finite()),
        delta: None,
        passed: false,
        reason: String::new(),
    };
    let Some(cand) = usable(raw_candidate) else {
        comparison.reason = match raw_candidate {
            None => format!("candidate has no metric `{}`", rule.name),
            Some(v) => format!("candidate metric `{}` is {}", rule.name, non_finite(v)),
        };
        return comparison;
    };
    if let Some(lo) = rule.min {
        if cand < lo {
            comparison.reason = format!("`{}` = {cand} is below the minimum {lo}", rule.name);
            return comparison;
        }
    }
    if let Some(hi) = rule.max {
        if cand > hi {
            comparison.reason = format!("`{}` = {cand} is above the maximum {hi}", rule.name);
            return comparison;
        }
    }
    let Some(baseline_metrics) = baseline else {
        comparison.passed = true;
        comparison.reason = format!("`{}` = {cand}: no production model", rule.name);
        return comparison;
    };
    let Some(base) = usable(raw_baseline) else {
        comparison.reason = match raw_baseline {
            None => format!("production model has no metric `{}`", rule.name),
            Some(v) => format!("production metric `{}` is {}", rule.name, non_finite(v)),
        };
        let _ = baseline_metrics;
        return comparison;
    };
    let improvement = match rule.direction {
        Direction::Higher => cand - base,
        Direction::Lower => base - cand,
    };
    comparison.delta = Some(improvement);
    let mut needed: Vec<String> = Vec::new();
    let mut ok = true;
    if rule.min_delta.is_none() && rule.min_relative.is_none() {
        ok &= improvement > 0.0;
        needed.push("strictly better".into());
    }
    if let Some(min_delta) = rule.min_delta {
        ok &= improvement >= min_delta;
        needed.push(format!("improvement >= {min_delta}"));
    }
    if let Some(min_relative) = rule.min_relative {
        // A zero baseline has no meaningful relative change (the MLflow
        // "better by 1e-10" trap): require a strict improvement instead.
        if base == 0.0 {
            ok &= improvement > 0.0;
            needed.push("strictly better (baseline is 0, relative rule undefined)".into());
        } else {
            ok &= improvement >= min_relative * base.abs();
            needed.push(format!(
                "improvement >= {:.4}% of baseline",
                min_relative * 100.0
            ));
        }
    }
    comparison.passed = ok;
    let verb = if ok { "meets" } else { "fails" };
    comparison.reason = format!(
        "`{}` {cand} vs {base} (delta {improvement:+.6}) {verb} {}",
        rule.name,
        needed.join(" and ")
    );
    comparison
}

/// How a non-finite metric is named in reasons (Python's spelling).
fn non_finite(value: f64) -> &'static str {
    if value.is_nan() {
        "NaN"
    } else if value.is_sign_positive() {
        "Infinity"
    } else {
        "-Infinity"
    }
}

/// Evaluate `policy` for `candidate` against `baseline` (`None` = no production model).
pub fn evaluate(policy: &GatePolicy, candidate: &Metrics, baseline: Option<&Metrics>) -> Verdict {
    let comparisons: Vec<Comparison> = policy
        .metrics
        .iter()
        .map(|rule| compare(rule, candidate.get(&rule.name).copied(), baseline))
        .collect();

    let first_model = baseline.is_none();
    // Missing / NaN metrics and bound violations always reject, even under
    // `require = "any"`: a silent pass on bad data is the failure users hate.
    // A failed comparison without a delta is exactly that: `compare` stops
    // before computing the delta when the candidate's or production's value
    // is missing or not finite, or a bound is violated.
    let hard_failure = comparisons.iter().find(|c| !c.passed && c.delta.is_none());

    let (passed, reason) = if let Some(failure) = hard_failure {
        (false, format!("rejected: {}", failure.reason))
    } else if first_model && policy.first_model == FirstModelPolicy::Fail {
        (
            false,
            "rejected: no production model and first_model = \"fail\"".to_string(),
        )
    } else if first_model {
        (
            true,
            "passed: first model (no production model to compare with)".to_string(),
        )
    } else {
        let passing = comparisons.iter().filter(|c| c.passed).count();
        let ok = match policy.require {
            Require::All => passing == comparisons.len(),
            Require::Any => passing > 0,
        };
        let failed: Vec<&str> = comparisons
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.metric.as_str())
            .collect();
        if ok {
            let better: Vec<&str> = comparisons
                .iter()
                .filter(|c| c.passed)
                .map(|c| c.metric.as_str())
                .collect();
            (true, format!("passed: better on {}", better.join(", ")))
        } else {
            (
                false,
                format!(
                    "rejected: not better on {} (require = {})",
                    failed.join(", "),
                    match policy.require {
                        Require::All => "all",
                        Require::Any => "any",
                    }
                ),
            )
        }
    };

    Verdict {
        passed,
        first_model,
        forced: false,
        comparisons,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(pairs: &[(&str, f64)]) -> Metrics {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn seed_rule_requires_both_strictly_better() {
        let policy = GatePolicy::seed_default();
        let prod = metrics(&[("dice", 0.80), ("iou", 0.70)]);
        let cases = [
            (metrics(&[("dice", 0.81), ("iou", 0.71)]), true),
            (metrics(&[("dice", 0.81), ("iou", 0.70)]), false),
            (metrics(&[("dice", 0.80), ("iou", 0.71)]), false),
            (metrics(&[("dice", 0.79), ("iou", 0.69)]), false),
        ];
        for (cand, expected) in cases {
            let verdict = evaluate(&policy, &cand, Some(&prod));
            assert_eq!(verdict.passed, expected, "{cand:?}: {}", verdict.reason);
            assert_eq!(verdict.comparisons.len(), 2);
        }
    }

    #[test]
    fn rejection_reason_names_the_metric() {
        let verdict = evaluate(
            &GatePolicy::seed_default(),
            &metrics(&[("dice", 0.9), ("iou", 0.5)]),
            Some(&metrics(&[("dice", 0.8), ("iou", 0.7)])),
        );
        assert!(!verdict.passed);
        assert!(verdict.reason.contains("iou"), "{}", verdict.reason);
        assert!(!verdict.reason.contains("dice"), "{}", verdict.reason);
    }

    #[test]
    fn lower_is_better() {
        let policy = GatePolicy {
            require: Require::All,
            metrics: vec![MetricRule::lower("loss")],
            first_model: FirstModelPolicy::Pass,
        };
        let prod = metrics(&[("loss", 0.5)]);
        assert!(evaluate(&policy, &metrics(&[("loss", 0.4)]), Some(&prod)).passed);
        assert!(!evaluate(&policy, &metrics(&[("loss", 0.5)]), Some(&prod)).passed);
        let v = evaluate(&policy, &metrics(&[("loss", 0.4)]), Some(&prod));
        assert!((v.comparisons[0].delta.unwrap() - 0.1).abs() < 1e-12);
    }

    #[test]
    fn min_delta_is_absolute_and_inclusive() {
        let policy = GatePolicy {
            require: Require::All,
            metrics: vec![MetricRule {
                min_delta: Some(0.02),
                ..MetricRule::higher("acc")
            }],
            first_model: FirstModelPolicy::Pass,
        };
        let prod = metrics(&[("acc", 0.5)]);
        assert!(!evaluate(&policy, &metrics(&[("acc", 0.51)]), Some(&prod)).passed);
        assert!(evaluate(&policy, &metrics(&[("acc", 0.53)]), Some(&prod)).passed);
        // Negative min_delta allows a bounded regression.
        let tolerant = GatePolicy {
            metrics: vec![MetricRule {
                min_delta: Some(-0.01),
                ..MetricRule::higher("acc")
            }],
            ..policy
        };
        assert!(evaluate(&tolerant, &metrics(&[("acc", 0.495)]), Some(&prod)).passed);
        assert!(!evaluate(&tolerant, &metrics(&[("acc", 0.48)]), Some(&prod)).passed);
    }

    #[test]
    fn min_relative_uses_the_baseline_and_handles_zero() {
        let policy = GatePolicy {
            require: Require::All,
            metrics: vec![MetricRule {
                min_relative: Some(0.10),
                ..MetricRule::higher("f1")
            }],
            first_model: FirstModelPolicy::Pass,
        };
        let prod = metrics(&[("f1", 0.5)]);
        assert!(!evaluate(&policy, &metrics(&[("f1", 0.54)]), Some(&prod)).passed);
        assert!(evaluate(&policy, &metrics(&[("f1", 0.56)]), Some(&prod)).passed);
        let zero = metrics(&[("f1", 0.0)]);
        assert!(evaluate(&policy, &metrics(&[("f1", 1e-9)]), Some(&zero)).passed);
        assert!(!evaluate(&policy, &metrics(&[("f1", 0.0)]), Some(&zero)).passed);
    }

    #[test]
    fn bounds_apply_with_and_without_baseline() {
        let policy = GatePolicy {
            require: Require::Any,
            metrics: vec![MetricRule {
                min: Some(0.6),
                max: Some(0.99),
                ..MetricRule::higher("dice")
            }],
            first_model: FirstModelPolicy::Pass,
        };
        let low = evaluate(&policy, &metrics(&[("dice", 0.5)]), None);
        assert!(!low.passed);
        assert!(low.reason.contains("below the minimum"), "{}", low.reason);
        let suspicious = evaluate(&policy, &metrics(&[("dice", 0.999)]), None);
        assert!(!suspicious.passed);
        assert!(evaluate(&policy, &metrics(&[("dice", 0.7)]), None).passed);
        // Bounds are inclusive: exactly `min` or exactly `max` is in range.
        assert!(evaluate(&policy, &metrics(&[("dice", 0.6)]), None).passed);
        assert!(evaluate(&policy, &metrics(&[("dice", 0.99)]), None).passed);
        let prod = metrics(&[("dice", 0.4)]);
        assert!(!evaluate(&policy, &metrics(&[("dice", 0.5)]), Some(&prod)).passed);
    }

    #[test]
    fn require_any_passes_on_one_improvement() {
        let policy = GatePolicy {
            require: Require::Any,
            ..GatePolicy::seed_default()
        };
        let prod = metrics(&[("dice", 0.8), ("iou", 0.7)]);
        assert!(
            evaluate(
                &policy,
                &metrics(&[("dice", 0.81), ("iou", 0.6)]),
                Some(&prod)
            )
            .passed
        );
        assert!(
            !evaluate(
                &policy,
                &metrics(&[("dice", 0.8), ("iou", 0.6)]),
                Some(&prod)
            )
            .passed
        );
    }

    #[test]
    fn missing_or_nan_metrics_reject_even_under_any() {
        let policy = GatePolicy {
            require: Require::Any,
            ..GatePolicy::seed_default()
        };
        let prod = metrics(&[("dice", 0.8), ("iou", 0.7)]);
        let missing = evaluate(&policy, &metrics(&[("dice", 0.99)]), Some(&prod));
        assert!(!missing.passed);
        assert!(
            missing.reason.contains("candidate has no metric `iou`"),
            "{}",
            missing.reason
        );

        let nan = evaluate(
            &policy,
            &metrics(&[("dice", 0.99), ("iou", f64::NAN)]),
            Some(&prod),
        );
        assert!(!nan.passed);
        assert!(nan.reason.contains("`iou` is NaN"), "{}", nan.reason);

        let prod_missing = evaluate(
            &policy,
            &metrics(&[("dice", 0.99), ("iou", 0.99)]),
            Some(&metrics(&[("dice", 0.8)])),
        );
        assert!(!prod_missing.passed);
        assert!(prod_missing
            .reason
            .contains("production model has no metric `iou`"));

        let prod_nan = evaluate(
            &policy,
            &metrics(&[("dice", 0.99), ("iou", 0.99)]),
            Some(&metrics(&[("dice", 0.8), ("iou", f64::NAN)])),
        );
        assert!(!prod_nan.passed);
        assert!(prod_nan.reason.contains("production metric `iou`"));
    }

    #[test]
    fn first_model_policy() {
        let mut policy = GatePolicy::seed_default();
        let cand = metrics(&[("dice", 0.1), ("iou", 0.1)]);
        let pass = evaluate(&policy, &cand, None);
        assert!(pass.passed && pass.first_model);
        policy.first_model = FirstModelPolicy::Fail;
        let fail = evaluate(&policy, &cand, None);
        assert!(!fail.passed && fail.first_model);
        // Even on the first model, a missing metric rejects.
        policy.first_model = FirstModelPolicy::Pass;
        assert!(!evaluate(&policy, &metrics(&[("dice", 0.5)]), None).passed);
    }

    #[test]
    fn force_overrides_and_is_recorded() {
        let verdict = evaluate(
            &GatePolicy::seed_default(),
            &metrics(&[("dice", 0.1), ("iou", 0.1)]),
            Some(&metrics(&[("dice", 0.8), ("iou", 0.7)])),
        );
        assert!(!verdict.passed);
        let forced = verdict.forced();
        assert!(forced.passed && forced.forced);
        assert!(
            forced.reason.starts_with("forced pass"),
            "{}",
            forced.reason
        );
    }

    #[test]
    fn policy_validation() {
        let seed = GatePolicy::seed_default();
        assert!(
            GatePolicy::new(seed.require(), seed.metrics().to_vec(), seed.first_model()).is_ok()
        );
        assert!(
            GatePolicy::new(Require::All, vec![], FirstModelPolicy::Pass)
                .unwrap_err()
                .contains("at least one metric")
        );
        let inverted = MetricRule {
            min: Some(1.0),
            max: Some(0.0),
            ..MetricRule::higher("x")
        };
        assert!(
            GatePolicy::new(Require::All, vec![inverted], FirstModelPolicy::Pass)
                .unwrap_err()
                .contains("greater than max")
        );
        for bound in ["min", "max", "min_delta", "min_relative"] {
            let mut rule = MetricRule::higher("acc");
            match bound {
                "min" => rule.min = Some(f64::NAN),
                "max" => rule.max = Some(f64::INFINITY),
                "min_delta" => rule.min_delta = Some(f64::NAN),
                _ => rule.min_relative = Some(f64::NEG_INFINITY),
            }
            let err =
                GatePolicy::new(Require::All, vec![rule], FirstModelPolicy::Pass).unwrap_err();
            assert!(err.contains(bound) && err.contains("finite"), "{err}");
        }
        let blank = MetricRule::higher("  ");
        assert!(GatePolicy::new(Require::Any, vec![blank], FirstModelPolicy::Fail).is_err());
    }

    #[test]
    fn a_metric_missing_in_production_rejects_even_under_require_any() {
        let policy = GatePolicy {
            require: Require::Any,
            ..GatePolicy::seed_default()
        };
        let prod = metrics(&[("dice", 0.5)]);
        let v = evaluate(
            &policy,
            &metrics(&[("dice", 0.9), ("iou", 0.9)]),
            Some(&prod),
        );
        assert!(!v.passed, "{}", v.reason);
        assert!(
            v.reason.contains("production model has no metric `iou`"),
            "{}",
            v.reason
        );
        // A candidate missing a metric likewise, even when another improved.
        let prod = metrics(&[("dice", 0.5), ("iou", 0.5)]);
        let v = evaluate(&policy, &metrics(&[("dice", 0.9)]), Some(&prod));
        assert!(!v.passed);
        assert!(
            v.reason.contains("candidate has no metric `iou`"),
            "{}",
            v.reason
        );
        // Whereas a metric that is merely not better does not, under `any`.
        let v = evaluate(
            &policy,
            &metrics(&[("dice", 0.9), ("iou", 0.4)]),
            Some(&prod),
        );
        assert!(v.passed, "{}", v.reason);
    }

    #[test]
    fn non_finite_metrics_are_named_and_reject() {
        let policy = GatePolicy::seed_default();
        for (value, word) in [
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
        ] {
            let v = evaluate(&policy, &metrics(&[("dice", value), ("iou", 0.9)]), None);
            assert!(!v.passed);
            assert!(
                v.reason.contains(&format!("`dice` is {word}")),
                "{}",
                v.reason
            );
            assert_eq!(v.comparisons[0].candidate, None);
            let prod = metrics(&[("dice", value), ("iou", 0.1)]);
            let v = evaluate(
                &policy,
                &metrics(&[("dice", 0.9), ("iou", 0.9)]),
                Some(&prod),
            );
            assert!(!v.passed);
            assert!(
                v.reason
                    .contains(&format!("production metric `dice` is {word}")),
                "{}",
                v.reason
            );
        }
    }

    #[test]
    fn deserialising_validates_and_round_trips() {
        let err = serde_json::from_value::<GatePolicy>(serde_json::json!({"metrics": []}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least one metric"), "{err}");
        let policy: GatePolicy = serde_json::from_value(serde_json::json!({
            "require": "any",
            "metrics": [{"name": "loss", "direction": "lower", "max": 0.5}],
            "first_model": "fail"
        }))
        .unwrap();
        assert_eq!(policy.require(), Require::Any);
        assert_eq!(policy.first_model(), FirstModelPolicy::Fail);
        assert_eq!(policy.metrics()[0].max, Some(0.5));
        let back: GatePolicy =
            serde_json::from_value(serde_json::to_value(&policy).unwrap()).unwrap();
        assert_eq!(back, policy);
    }
}
