//! `CountSource` running the user's SQL (their schema is theirs) against
//! SQLite or Postgres.
//!
//! Contract of the query: the result has the columns `label` (text),
//! `misclassified` and `correct` (integers >= 0), one row per label (rows of
//! one label are added up). Its parameters come in one of two forms
//! ([`WatermarkForm`]): one watermark as `$1` (on SQLite `?` and `?1` work
//! too), or every label's own watermark as a relation `watermarks(label,
//! since)` (Postgres `unnest($1::text[], $2::timestamptz[])`, SQLite
//! `json_each($1)`), so that labels at different watermarks are counted by
//! one statement ([`CountSource::counts_per_label`]). The query runs
//! once per call, read-only, with a statement timeout.

mod postgres;
mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use retrain_core::domain::{FeedbackCounts, Label};
use retrain_core::ports::{CountSource, PortError};
use serde::Deserialize;

use crate::db::DbUrl;
use crate::AdapterError;

pub use postgres::PostgresCountSource;
pub use sqlite::SqliteCountSource;

/// The config keys named in errors.
const KEY_DATABASE: &str = "counts.database";
const KEY_QUERY: &str = "counts.query";

/// How the count query runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountOptions {
    /// Longest the query may run (Postgres `statement_timeout`; a client-side
    /// deadline on SQLite).
    pub statement_timeout: Duration,
    /// How the query takes its watermarks.
    pub form: WatermarkForm,
    /// The configured labels: in the [`WatermarkForm::PerLabel`] form,
    /// [`CountSource::counts`] binds every one of them at the one watermark
    /// it is given.
    pub labels: Vec<Label>,
}

impl Default for CountOptions {
    fn default() -> Self {
        Self {
            statement_timeout: Duration::from_secs(30),
            form: WatermarkForm::default(),
            labels: Vec::new(),
        }
    }
}

/// How the count query takes its watermarks (`[counts] watermarks`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatermarkForm {
    /// One watermark bound as `$1`: labels at different watermarks take one
    /// statement per distinct watermark.
    #[default]
    Shared,
    /// Every label's own watermark, as the relation `watermarks(label,
    /// since)`: on Postgres `$1` is the labels (`text[]`) and `$2` their
    /// watermarks (`timestamptz[]`), read with `unnest($1::text[],
    /// $2::timestamptz[]) AS w(label, since)`; on SQLite `$1` is a JSON array
    /// of `{"label": …, "since": …}` read with `json_each($1)`. One statement
    /// counts every label, whatever their watermarks.
    PerLabel,
}

/// Only the labels that were asked for: a row of another label was not
/// counted at any watermark the caller gave.
fn asked_for(
    mut counts: BTreeMap<Label, FeedbackCounts>,
    watermarks: &BTreeMap<Label, DateTime<Utc>>,
) -> BTreeMap<Label, FeedbackCounts> {
    counts.retain(|label, _| watermarks.contains_key(label));
    counts
}

/// Every configured label at one watermark: what [`CountSource::counts`]
/// binds in the per-label form.
fn all_labels_at(labels: &[Label], since: DateTime<Utc>) -> BTreeMap<Label, DateTime<Utc>> {
    labels.iter().map(|l| (l.clone(), since)).collect()
}

/// Build the count source for `url` running `query`.
pub async fn open_count_source(
    url: &str,
    query: &str,
    options: CountOptions,
) -> Result<Arc<dyn CountSource>, AdapterError> {
    let url = DbUrl::parse(KEY_DATABASE, url)?;
    if query.trim().is_empty() {
        return Err(AdapterError::config(
            KEY_QUERY,
            "the count query is empty; expected SQL returning `label, misclassified, correct` \
             with the watermark as $1",
        ));
    }
    if options.statement_timeout.is_zero() {
        return Err(AdapterError::config(
            "counts.statement_timeout",
            "must be greater than zero",
        ));
    }
    check_form(&url, query, options.form)?;
    match &url {
        DbUrl::SqliteFile(_) | DbUrl::SqliteMemory => Ok(Arc::new(
            SqliteCountSource::open(url.clone(), query.to_owned(), options).await?,
        )),
        DbUrl::Postgres(_) => Ok(Arc::new(
            PostgresCountSource::open(url.clone(), query.to_owned(), options).await?,
        )),
    }
}

/// Catch a query written for the other [`WatermarkForm`] before it runs:
/// the wrong binds would fail obscurely on Postgres and count silently
/// wrong on SQLite (a JSON array compared with timestamps as text).
fn check_form(url: &DbUrl, query: &str, form: WatermarkForm) -> Result<(), AdapterError> {
    let postgres = matches!(url, DbUrl::Postgres(_));
    let lower = query.to_ascii_lowercase();
    let problem = match (form, postgres) {
        (WatermarkForm::Shared, true) if query.contains("$2") => Some(
            "uses $2, but only the watermark ($1) is bound; for every label's own watermark \
             set `watermarks = \"per_label\"` and read `unnest($1::text[], $2::timestamptz[]) \
             AS w(label, since)`",
        ),
        (WatermarkForm::Shared, false) if lower.contains("json_each") => Some(
            "reads json_each, but only the watermark ($1) is bound; for every label's own \
             watermark set `watermarks = \"per_label\"`",
        ),
        (WatermarkForm::PerLabel, true) if !query.contains("$2") => Some(
            "with `watermarks = \"per_label\"` the query gets the labels as $1 (text[]) and \
             their watermarks as $2 (timestamptz[]): read them with \
             `unnest($1::text[], $2::timestamptz[]) AS w(label, since)`",
        ),
        (WatermarkForm::PerLabel, false) if !lower.contains("json_each") => Some(
            "with `watermarks = \"per_label\"` the query gets $1 = a JSON array of \
             {\"label\", \"since\"}: read it with `json_each($1)` (`value ->> 'label'`, \
             `value ->> 'since'`)",
        ),
        _ => None,
    };
    match problem {
        Some(problem) => Err(AdapterError::config(KEY_QUERY, problem)),
        None => Ok(()),
    }
}

/// A count cell as read from a row, before validation.
enum Cell<T> {
    Value(T),
    Null,
    /// The column exists with a type we do not accept (named).
    WrongType(String),
    Missing,
}

/// Accumulates validated rows into the port's answer.
#[derive(Default)]
struct Tally {
    counts: BTreeMap<Label, FeedbackCounts>,
    rows: usize,
}

impl Tally {
    /// Validate every row of a result set; `text` and `int` read one cell the
    /// way the backend types it. Shared by the SQLite and Postgres sources.
    fn of_rows<R: sqlx::Row>(
        rows: &[R],
        text: fn(&R, &str) -> Cell<String>,
        int: fn(&R, &str) -> Cell<i64>,
    ) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
        use sqlx::Column;
        let mut tally = Self::default();
        for row in rows {
            let columns: Vec<String> = row.columns().iter().map(|c| c.name().to_owned()).collect();
            tally.add(
                text(row, "label"),
                int(row, "misclassified"),
                int(row, "correct"),
                &columns,
            )?;
        }
        Ok(tally.counts)
    }

    /// Validate one row. `columns` lists what the query returned, for the
    /// "missing column" message.
    fn add(
        &mut self,
        label: Cell<String>,
        misclassified: Cell<i64>,
        correct: Cell<i64>,
        columns: &[String],
    ) -> Result<(), PortError> {
        self.rows += 1;
        let row = self.rows;
        let invalid = |m: String| PortError::InvalidResponse(format!("count query: {m}"));
        let label = match label {
            Cell::Value(raw) => Label::new(&raw).map_err(|_| {
                invalid(format!(
                    "column `label` in row {row} holds {raw:?}, which is not a valid label \
                     (1-64 characters of a-z, 0-9, '_' or '-')"
                ))
            })?,
            Cell::Null => return Err(invalid(format!("column `label` is NULL in row {row}"))),
            Cell::WrongType(ty) => {
                return Err(invalid(format!("column `label` must be text, got {ty}")))
            }
            Cell::Missing => return Err(missing("label", columns)),
        };
        let count = |name: &str, cell: Cell<i64>| -> Result<u64, PortError> {
            match cell {
                Cell::Value(n) => u64::try_from(n).map_err(|_| {
                    invalid(format!(
                        "column `{name}` is negative ({n}) for label `{label}`"
                    ))
                }),
                Cell::Null => Err(invalid(format!(
                    "column `{name}` is NULL for label `{label}` (use COALESCE(…, 0))"
                ))),
                Cell::WrongType(ty) => Err(invalid(format!(
                    "column `{name}` must be an integer, got {ty} for label `{label}` \
                     (cast it, e.g. `sum(x)::bigint`)"
                ))),
                Cell::Missing => Err(missing(name, columns)),
            }
        };
        let misclassified = count("misclassified", misclassified)?;
        let correct = count("correct", correct)?;
        let entry = self.counts.entry(label).or_default();
        entry.misclassified = entry.misclassified.saturating_add(misclassified);
        entry.correct = entry.correct.saturating_add(correct);
        Ok(())
    }
}

fn missing(name: &str, columns: &[String]) -> PortError {
    PortError::InvalidResponse(format!(
        "count query: the result has no column `{name}` (expected `label, misclassified, \
         correct`; got `{}`)",
        columns.join(", ")
    ))
}

/// Run `fut` under the client-side deadline, which backs up the server-side
/// timeout (and is the only one on SQLite).
async fn with_deadline<T>(
    timeout: Duration,
    describe: &str,
    fut: impl std::future::Future<Output = Result<T, PortError>>,
) -> Result<T, PortError> {
    // Slack so that the server-side timeout, with its clearer error, wins.
    let deadline = timeout + Duration::from_secs(2);
    tokio::time::timeout(deadline, fut)
        .await
        .unwrap_or_else(|_| {
            Err(PortError::Failed(format!(
                "count query on {describe} did not finish within {}s (statement timeout)",
                timeout.as_secs_f64()
            )))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Vec<String> {
        vec!["label".into(), "misclassified".into(), "correct".into()]
    }

    #[test]
    fn rows_of_one_label_add_up() {
        let mut t = Tally::default();
        t.add(
            Cell::Value("Dept".into()),
            Cell::Value(2),
            Cell::Value(3),
            &cols(),
        )
        .unwrap();
        t.add(
            Cell::Value("dept".into()),
            Cell::Value(1),
            Cell::Value(0),
            &cols(),
        )
        .unwrap();
        let dept = Label::new("dept").unwrap();
        assert_eq!(
            t.counts[&dept],
            FeedbackCounts {
                misclassified: 3,
                correct: 3
            }
        );
    }

    #[test]
    fn errors_name_the_column_and_label() {
        type Case = (Cell<String>, Cell<i64>, Cell<i64>, &'static str);
        let cases: Vec<Case> = vec![
            (
                Cell::Missing,
                Cell::Value(1),
                Cell::Value(1),
                "no column `label`",
            ),
            (
                Cell::Value("a b".into()),
                Cell::Value(1),
                Cell::Value(1),
                "\"a b\"",
            ),
            (
                Cell::Null,
                Cell::Value(1),
                Cell::Value(1),
                "`label` is NULL",
            ),
            (
                Cell::Value("x".into()),
                Cell::Value(-1),
                Cell::Value(1),
                "`misclassified` is negative (-1) for label `x`",
            ),
            (
                Cell::Value("x".into()),
                Cell::Value(1),
                Cell::WrongType("TEXT".into()),
                "`correct` must be an integer, got TEXT",
            ),
            (
                Cell::Value("x".into()),
                Cell::Value(1),
                Cell::Null,
                "`correct` is NULL for label `x`",
            ),
            (
                Cell::Value("x".into()),
                Cell::Missing,
                Cell::Value(1),
                "no column `misclassified`",
            ),
        ];
        for (label, mis, cor, needle) in cases {
            let err = Tally::default().add(label, mis, cor, &cols()).unwrap_err();
            assert!(matches!(err, PortError::InvalidResponse(_)));
            assert!(
                err.message().contains(needle),
                "{err} should contain {needle}"
            );
        }
    }
}
