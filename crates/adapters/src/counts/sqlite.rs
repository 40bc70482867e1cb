//! Count query over a SQLite file, opened read-only.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use retrain_core::domain::{FeedbackCounts, Label};
use retrain_core::ports::{CountSource, PortError};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{Row, TypeInfo, ValueRef};

use super::{
    all_labels_at, asked_for, with_deadline, Cell, CountOptions, Tally, WatermarkForm, KEY_DATABASE,
};
use crate::db::DbUrl;
use crate::AdapterError;

/// The SQLite count source.
pub struct SqliteCountSource {
    pool: SqlitePool,
    url: DbUrl,
    query: String,
    options: CountOptions,
}

impl std::fmt::Debug for SqliteCountSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteCountSource")
            .field("url", &self.url)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The watermark as SQLite text: RFC 3339 with microseconds and `+00:00`,
/// the form Python's `isoformat()` writes, so that text comparison with such
/// columns is time order. Other formats: normalise in the query, e.g.
/// `julianday(reviewed_at) > julianday($1)`.
pub(crate) fn watermark_text(since: DateTime<Utc>) -> String {
    since.to_rfc3339_opts(SecondsFormat::Micros, false)
}

impl SqliteCountSource {
    pub(crate) async fn open(
        url: DbUrl,
        query: String,
        options: CountOptions,
    ) -> Result<Self, AdapterError> {
        // Read-only at the connection level: the query cannot write even
        // if it tries (and the memory form is only useful in tests).
        let read_only = matches!(url, DbUrl::SqliteFile(_));
        let pool = url.sqlite_pool(KEY_DATABASE, read_only).await?;
        Ok(Self {
            pool,
            url,
            query,
            options,
        })
    }

    /// The pool, for tests that fill an in-memory database.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn error(&self, e: sqlx::Error) -> PortError {
        let where_ = self.url.redacted();
        let msg = self.url.scrub(&e);
        match &e {
            sqlx::Error::Database(db) => {
                // SQLITE_READONLY and its extended codes (8, 264, 520...).
                let readonly = db
                    .code()
                    .and_then(|c| c.parse::<i64>().ok())
                    .is_some_and(|c| c & 0xff == 8);
                if readonly {
                    PortError::Denied(format!(
                        "count query on {where_} tried to write; it must be read-only: {msg}"
                    ))
                } else {
                    PortError::Config(format!("count query on {where_} failed: {msg}"))
                }
            }
            _ => PortError::Transient(format!("count query on {where_}: {msg}")),
        }
    }
}

fn cell_text(row: &SqliteRow, name: &str) -> Cell<String> {
    let Ok(raw) = row.try_get_raw(name) else {
        return Cell::Missing;
    };
    if raw.is_null() {
        return Cell::Null;
    }
    let ty = raw.type_info().name().to_owned();
    match row.try_get::<String, _>(name) {
        Ok(v) => Cell::Value(v),
        Err(_) => Cell::WrongType(ty),
    }
}

fn cell_int(row: &SqliteRow, name: &str) -> Cell<i64> {
    let Ok(raw) = row.try_get_raw(name) else {
        return Cell::Missing;
    };
    if raw.is_null() {
        return Cell::Null;
    }
    // The value's storage class, not the declared type: SQLite is dynamically
    // typed and `sum()`, `count()` report no declared type.
    let ty = raw.type_info().name().to_owned();
    if ty != "INTEGER" {
        return Cell::WrongType(ty);
    }
    match row.try_get::<i64, _>(name) {
        Ok(v) => Cell::Value(v),
        Err(_) => Cell::WrongType(ty),
    }
}

impl SqliteCountSource {
    /// Run the query with its one parameter: the watermark, or (per-label
    /// form) the JSON array of `{"label", "since"}`.
    async fn counted(&self, param: String) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
        let describe = self.url.redacted();
        with_deadline(self.options.statement_timeout, &describe, async {
            let rows = sqlx::query(&self.query)
                .bind(param)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
            Tally::of_rows(&rows, cell_text, cell_int)
        })
        .await
    }

    async fn per_label(
        &self,
        watermarks: &BTreeMap<Label, DateTime<Utc>>,
    ) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
        let relation: Vec<serde_json::Value> = watermarks
            .iter()
            .map(|(label, since)| {
                serde_json::json!({ "label": label.as_str(), "since": watermark_text(*since) })
            })
            .collect();
        let counts = self
            .counted(serde_json::Value::Array(relation).to_string())
            .await?;
        Ok(asked_for(counts, watermarks))
    }
}

#[async_trait]
impl CountSource for SqliteCountSource {
    async fn counts(
        &self,
        since: DateTime<Utc>,
    ) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
        match self.options.form {
            WatermarkForm::Shared => self.counted(watermark_text(since)).await,
            WatermarkForm::PerLabel => {
                self.per_label(&all_labels_at(&self.options.labels, since))
                    .await
            }
        }
    }

    async fn counts_per_label(
        &self,
        watermarks: &BTreeMap<Label, DateTime<Utc>>,
    ) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
        match self.options.form {
            WatermarkForm::Shared => {
                retrain_core::ports::counts_per_distinct_watermark(self, watermarks).await
            }
            WatermarkForm::PerLabel => self.per_label(watermarks).await,
        }
    }
}
