//! Count query over Postgres: a read-only transaction with a local
//! `statement_timeout`, so a runaway or writing query is stopped by the
//! server itself.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_core::domain::{FeedbackCounts, Label};
use retrain_core::ports::{CountSource, PortError};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{Row, TypeInfo, ValueRef};

use super::{
    all_labels_at, asked_for, with_deadline, Cell, CountOptions, Tally, WatermarkForm, KEY_DATABASE,
};
use crate::db::DbUrl;
use crate::AdapterError;

/// The query runs once per cycle: two connections cover a concurrent
/// `retrain plan` without holding more of the user's database.
const MAX_CONNECTIONS: u32 = 2;

/// The Postgres count source.
pub struct PostgresCountSource {
    pool: PgPool,
    url: DbUrl,
    query: String,
    options: CountOptions,
}

impl std::fmt::Debug for PostgresCountSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresCountSource")
            .field("url", &self.url)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl PostgresCountSource {
    pub(crate) async fn open(
        url: DbUrl,
        query: String,
        options: CountOptions,
    ) -> Result<Self, AdapterError> {
        let pool = url
            .postgres_pool(KEY_DATABASE, MAX_CONNECTIONS, false)
            .await?;
        Ok(Self {
            pool,
            url,
            query,
            options,
        })
    }

    fn error(&self, e: sqlx::Error) -> PortError {
        let where_ = self.url.redacted();
        let msg = self.url.scrub(&e);
        match &e {
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("57014") => PortError::Failed(format!(
                    "count query on {where_} was cancelled by statement_timeout ({}s): {msg}",
                    self.options.statement_timeout.as_secs_f64()
                )),
                Some("25006") => PortError::Denied(format!(
                    "count query on {where_} tried to write; it runs in a read-only transaction: {msg}"
                )),
                Some(code) if code.starts_with("42") => {
                    PortError::Config(format!("count query on {where_} is invalid: {msg}"))
                }
                Some("28000" | "28P01") => {
                    PortError::Denied(format!("count query on {where_}: {msg}"))
                }
                _ => PortError::Failed(format!("count query on {where_} failed: {msg}")),
            },
            _ => PortError::Transient(format!("count query on {where_}: {msg}")),
        }
    }

    /// The query's parameters: `$1` = the watermark, or (per-label form)
    /// `$1` = the labels and `$2` = their watermarks, in the same order.
    async fn run(&self, binds: Binds) -> Result<Vec<PgRow>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION READ ONLY")
            .execute(&mut *tx)
            .await?;
        // SET takes no bind parameters; the value is an integer we format.
        let millis = self
            .options
            .statement_timeout
            .as_millis()
            .clamp(1, i32::MAX as u128);
        sqlx::query(&format!("SET LOCAL statement_timeout = {millis}"))
            .execute(&mut *tx)
            .await?;
        let query = sqlx::query(&self.query);
        let query = match binds {
            Binds::Since(since) => query.bind(since),
            Binds::PerLabel(labels, watermarks) => query.bind(labels).bind(watermarks),
        };
        let rows = query.fetch_all(&mut *tx).await?;
        tx.rollback().await?;
        Ok(rows)
    }
}

enum Binds {
    Since(DateTime<Utc>),
    PerLabel(Vec<String>, Vec<DateTime<Utc>>),
}

impl PostgresCountSource {
    async fn counted(&self, binds: Binds) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
        let describe = self.url.redacted();
        with_deadline(self.options.statement_timeout, &describe, async {
            let rows = self.run(binds).await.map_err(|e| self.error(e))?;
            Tally::of_rows(&rows, cell_text, cell_int)
        })
        .await
    }

    async fn per_label(
        &self,
        watermarks: &BTreeMap<Label, DateTime<Utc>>,
    ) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
        let (labels, sinces) = watermarks
            .iter()
            .map(|(label, since)| (label.as_str().to_owned(), *since))
            .unzip();
        let counts = self.counted(Binds::PerLabel(labels, sinces)).await?;
        Ok(asked_for(counts, watermarks))
    }
}

fn cell_text(row: &PgRow, name: &str) -> Cell<String> {
    let Ok(raw) = row.try_get_raw(name) else {
        return Cell::Missing;
    };
    let ty = raw.type_info().name().to_owned();
    if raw.is_null() {
        return Cell::Null;
    }
    match row.try_get::<String, _>(name) {
        Ok(v) => Cell::Value(v),
        Err(_) => Cell::WrongType(ty),
    }
}

/// Integers of any width; `numeric` (what `sum(bigint)` returns) is refused
/// with a hint to cast, rather than risking a lossy conversion.
fn cell_int(row: &PgRow, name: &str) -> Cell<i64> {
    let Ok(raw) = row.try_get_raw(name) else {
        return Cell::Missing;
    };
    let ty = raw.type_info().name().to_owned();
    if raw.is_null() {
        return Cell::Null;
    }
    let value = match ty.as_str() {
        "INT8" => row.try_get::<i64, _>(name),
        "INT4" => row.try_get::<i32, _>(name).map(i64::from),
        "INT2" => row.try_get::<i16, _>(name).map(i64::from),
        _ => return Cell::WrongType(ty),
    };
    match value {
        Ok(v) => Cell::Value(v),
        Err(_) => Cell::WrongType(ty),
    }
}

#[async_trait]
impl CountSource for PostgresCountSource {
    async fn counts(
        &self,
        since: DateTime<Utc>,
    ) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
        match self.options.form {
            WatermarkForm::Shared => self.counted(Binds::Since(since)).await,
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
