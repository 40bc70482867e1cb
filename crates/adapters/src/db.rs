//! Database URLs and connection pools shared by the SQL adapters (the run
//! store and the count source).
//!
//! URLs carry passwords, so nothing here ever formats a raw URL: errors and
//! `Debug` output use [`DbUrl::redacted`], and driver messages go through
//! [`DbUrl::scrub`] in case a driver echoes the URL back.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Connection;

use crate::AdapterError;

/// How long a SQLite connection waits for another writer (possibly another
/// process) before giving up with `SQLITE_BUSY`.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Page cache per connection, in KiB (SQLite's default is 2 MiB). Filled
/// only as pages are read; a full cycle of 1,000 labels touches ≈ 8 MiB, and
/// with the default most B-tree steps re-read their page from the OS
/// (docs/BENCHMARKS.md).
const SQLITE_CACHE_KIB: u32 = 8 * 1024;
/// Reads of the database file through a memory map instead of one `pread`
/// system call per page missing from the cache (address space; the pages
/// are the OS file cache's, shared, though counted in the RSS once touched).
const SQLITE_MMAP_BYTES: u64 = 256 * 1024 * 1024;
/// Connections of a SQLite pool (readers; a run store writes through one
/// more, see [`DbUrl::sqlite_writer`]). Eight were measured slower than
/// four on the 1,000-label cycle (`docs/BENCHMARKS.md`).
pub(crate) const SQLITE_POOL_CONNECTIONS: u32 = 4;
/// How long acquiring a pooled connection (including connecting) may take.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(15);

/// A parsed database URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum DbUrl {
    /// A SQLite file (created with its parent directories when writable).
    SqliteFile(PathBuf),
    /// `sqlite::memory:`: private to one connection, for tests.
    SqliteMemory,
    /// A `postgres://` URL (SQLAlchemy forms already normalised).
    Postgres(String),
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl DbUrl {
    /// Parse `raw`, the value of config key `key` (named in errors).
    pub(crate) fn parse(key: &str, raw: &str) -> Result<Self, AdapterError> {
        let trimmed = raw.trim();
        let accepted = "expected sqlite://PATH, sqlite::memory:, postgres://…, postgresql://… \
                        or postgresql+psycopg2://…";
        if trimmed == "sqlite::memory:" || trimmed == "sqlite://:memory:" {
            return Ok(Self::SqliteMemory);
        }
        if let Some(path) = trimmed.strip_prefix("sqlite://") {
            // Query options (`?mode=rwc`) are sqlx-specific; we set our own.
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err(AdapterError::config(
                    key,
                    format!("sqlite URL has no file path; {accepted}"),
                ));
            }
            return Ok(Self::SqliteFile(PathBuf::from(path)));
        }
        let (scheme, rest) = trimmed.split_once("://").ok_or_else(|| {
            AdapterError::config(
                key,
                format!("`{}` is not a database URL; {accepted}", redact(trimmed)),
            )
        })?;
        // SQLAlchemy spells the driver into the scheme (`postgresql+psycopg2`);
        // the wire protocol is the same, so any `postgresql+DRIVER` is accepted.
        let base = scheme.split('+').next().unwrap_or_default();
        if matches!(base, "postgres" | "postgresql") {
            let url = format!("postgres://{rest}");
            url::Url::parse(&url).map_err(|e| {
                AdapterError::config(key, format!("invalid Postgres URL `{}`: {e}", redact(&url)))
            })?;
            return Ok(Self::Postgres(url));
        }
        Err(AdapterError::config(
            key,
            format!("unsupported database URL scheme `{scheme}://`; {accepted}"),
        ))
    }

    /// The URL with any password replaced by `***`.
    pub(crate) fn redacted(&self) -> String {
        match self {
            Self::SqliteFile(path) => format!("sqlite://{}", path.display()),
            Self::SqliteMemory => "sqlite::memory:".into(),
            Self::Postgres(url) => redact(url),
        }
    }

    /// Remove the password from a driver message, in case it echoes the URL:
    /// the user-info password and the `password`, `sslpassword` and
    /// `passfile` query parameters, each as written and decoded.
    pub(crate) fn scrub(&self, message: impl fmt::Display) -> String {
        let mut out = message.to_string();
        let Self::Postgres(url) = self else {
            return out;
        };
        // Longest first, so a secret containing another is replaced whole.
        let mut secrets = url_secrets(url);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for secret in secrets {
            out = out.replace(&secret, "***");
        }
        out
    }

    /// A SQLite pool: WAL so readers never block the writer, and a busy
    /// timeout so two processes can share one file.
    pub(crate) async fn sqlite_pool(
        &self,
        key: &str,
        read_only: bool,
    ) -> Result<SqlitePool, AdapterError> {
        self.sqlite_pool_of(key, read_only, SQLITE_POOL_CONNECTIONS)
            .await
    }

    /// The pool a process writes a SQLite database through: one connection
    /// of its own, beside `pool` (the readers'), so writers queue for it
    /// rather than for SQLite's write lock. An in-memory database (one
    /// connection in all) and a read-only one write through `pool`.
    pub(crate) async fn sqlite_writer(
        &self,
        key: &str,
        read_only: bool,
        pool: &SqlitePool,
    ) -> Result<SqlitePool, AdapterError> {
        match self {
            Self::SqliteFile(_) if !read_only => self.sqlite_pool_of(key, false, 1).await,
            _ => Ok(pool.clone()),
        }
    }

    async fn sqlite_pool_of(
        &self,
        key: &str,
        read_only: bool,
        connections: u32,
    ) -> Result<SqlitePool, AdapterError> {
        let (options, pool) = match self {
            Self::SqliteMemory => (
                SqliteConnectOptions::from_str("sqlite::memory:")
                    .map_err(|e| AdapterError::config(key, e.to_string()))?,
                // Every in-memory connection is its own database: keep
                // exactly one alive for the whole life of the pool.
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None),
            ),
            Self::SqliteFile(path) => {
                if read_only {
                    if !path.exists() {
                        return Err(AdapterError::config(
                            key,
                            format!("SQLite database {} does not exist", path.display()),
                        ));
                    }
                } else if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        AdapterError::config(
                            key,
                            format!("cannot create directory {}: {e}", parent.display()),
                        )
                    })?;
                }
                let mut options = SqliteConnectOptions::new()
                    .filename(path)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
                    .foreign_keys(true)
                    .pragma("cache_size", format!("-{SQLITE_CACHE_KIB}"))
                    .pragma("mmap_size", SQLITE_MMAP_BYTES.to_string());
                options = if read_only {
                    options.read_only(true)
                } else {
                    options
                        .create_if_missing(true)
                        .journal_mode(SqliteJournalMode::Wal)
                        // WAL + NORMAL is durable across process crashes,
                        // which is what the journal needs.
                        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                };
                (
                    options,
                    SqlitePoolOptions::new().max_connections(connections),
                )
            }
            Self::Postgres(_) => {
                return Err(AdapterError::config(key, "not a SQLite URL"));
            }
        };
        let pool = pool.acquire_timeout(ACQUIRE_TIMEOUT);
        // Switching a fresh file to WAL takes a write lock that SQLite's busy
        // handler does not cover, so two processes opening the same new file
        // can see "database is locked": retry that, briefly.
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match pool.clone().connect_with(options.clone()).await {
                Ok(pool) => return Ok(pool),
                Err(e) if attempt < 20 && is_sqlite_busy(&e) => {
                    tokio::time::sleep(Duration::from_millis(25 * u64::from(attempt))).await;
                }
                Err(e) => {
                    return Err(AdapterError::Unavailable(format!(
                        "{key}: cannot open SQLite database {}: {}",
                        self.redacted(),
                        self.scrub(e)
                    )))
                }
            }
        }
    }

    /// A Postgres pool, connected eagerly so a bad URL fails at startup.
    pub(crate) async fn postgres_pool(
        &self,
        key: &str,
        max_connections: u32,
        read_only: bool,
    ) -> Result<PgPool, AdapterError> {
        let Self::Postgres(url) = self else {
            return Err(AdapterError::config(key, "not a Postgres URL"));
        };
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| {
                AdapterError::config(
                    key,
                    format!(
                        "invalid Postgres URL {}: {}",
                        self.redacted(),
                        self.scrub(e)
                    ),
                )
            })?
            .application_name("retrain");
        // Read-only sessions: the server refuses any write, whatever the code does.
        let options = if read_only {
            options.options([("default_transaction_read_only", "on")])
        } else {
            options
        };
        // One direct connection first: a pool retries refused connections
        // until its acquire timeout and then reports only "timed out", while
        // this reports the real cause (refused, bad password, no database) at once.
        let probe = tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut));
        let probe = probe.map_err(|e| {
            AdapterError::Unavailable(format!(
                "{key}: cannot connect to Postgres at {}: {}",
                self.redacted(),
                self.scrub(e)
            ))
        })?;
        let _ = probe.close().await;
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| {
                AdapterError::Unavailable(format!(
                    "{key}: cannot connect to Postgres at {}: {}",
                    self.redacted(),
                    self.scrub(e)
                ))
            })
    }
}

/// SQLITE_BUSY / SQLITE_LOCKED: another connection holds the lock.
fn is_sqlite_busy(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("5" | "6" | "517")),
        _ => false,
    }
}

/// Query parameters of a libpq URL whose value is a secret (`passfile` is a
/// path, but where the password lives is masked too).
const SECRET_QUERY_KEYS: [&str; 3] = ["password", "sslpassword", "passfile"];

fn is_secret_key(key: &str) -> bool {
    let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
    SECRET_QUERY_KEYS
        .iter()
        .any(|k| k.eq_ignore_ascii_case(&key))
}

/// `url` with its password replaced by `***`, in the user info
/// (`user:***@host`) and in the query (`?password=***`, `sslpassword`,
/// `passfile`). Unparseable URLs are hidden entirely: they might be nothing
/// but a secret.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                // Cannot fail for URLs that already have a password.
                let _ = parsed.set_password(Some("***"));
            }
            if let Some(query) = parsed.query().map(str::to_owned) {
                // Pair by pair, so the other parameters keep their spelling.
                let masked: Vec<String> = query
                    .split('&')
                    .map(|pair| {
                        let key = pair.split('=').next().unwrap_or_default();
                        if is_secret_key(key) {
                            format!("{key}=***")
                        } else {
                            pair.to_owned()
                        }
                    })
                    .collect();
                parsed.set_query(Some(&masked.join("&")));
            }
            parsed.to_string()
        }
        Err(_) => "<unparseable URL>".into(),
    }
}

/// Every spelling of every secret in `url`: the user-info password and the
/// secret query values, as written (percent-encoded) and decoded.
fn url_secrets(url: &str) -> Vec<String> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Vec::new();
    };
    let mut secrets = Vec::new();
    if let Some(password) = parsed.password() {
        secrets.push(password.to_owned());
        secrets.push(
            percent_encoding::percent_decode_str(password)
                .decode_utf8_lossy()
                .into_owned(),
        );
    }
    for pair in parsed.query().unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if is_secret_key(key) {
            secrets.push(value.to_owned());
            // Query values are form-encoded: `+` is a space.
            secrets.extend(
                url::form_urlencoded::parse(format!("v={value}").as_bytes())
                    .map(|(_, v)| v.into_owned()),
            );
        }
    }
    secrets.retain(|s| !s.is_empty());
    secrets.sort();
    secrets.dedup();
    secrets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_files_open_with_the_larger_page_cache_and_a_memory_map() {
        let dir = tempfile::tempdir().unwrap();
        let url = DbUrl::SqliteFile(dir.path().join("state.db"));
        for read_only in [false, true] {
            let pool = url.sqlite_pool("state", read_only).await.unwrap();
            let cache: i64 = sqlx::query_scalar("PRAGMA cache_size")
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(cache, -i64::from(SQLITE_CACHE_KIB));
            let mmap: i64 = sqlx::query_scalar("PRAGMA mmap_size")
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(mmap, SQLITE_MMAP_BYTES as i64);
            pool.close().await;
        }
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(
            DbUrl::parse("state", "sqlite://.retrain/state.db").unwrap(),
            DbUrl::SqliteFile(".retrain/state.db".into())
        );
        assert_eq!(
            DbUrl::parse("state", "sqlite:///abs/x.db").unwrap(),
            DbUrl::SqliteFile("/abs/x.db".into())
        );
        assert_eq!(
            DbUrl::parse("state", "sqlite::memory:").unwrap(),
            DbUrl::SqliteMemory
        );
        for raw in [
            "postgres://u:p@h:5432/db",
            "postgresql://u:p@h:5432/db",
            "postgresql+psycopg2://u:p@h:5432/db",
        ] {
            assert_eq!(
                DbUrl::parse("state", raw).unwrap(),
                DbUrl::Postgres("postgres://u:p@h:5432/db".into())
            );
        }
    }

    #[test]
    fn rejects_other_schemes_naming_the_key_without_the_password() {
        for raw in [
            "mysql://u:hunter2@h/db",
            "hunter2",
            "sqlite://",
            "file:///x",
        ] {
            let err = DbUrl::parse("state", raw).unwrap_err().to_string();
            assert!(err.starts_with("state: "), "{err}");
            assert!(err.contains("postgres://"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn passwords_never_show() {
        let url = DbUrl::parse("state", "postgresql+psycopg2://bob:s3cr%3Et@db:5432/x").unwrap();
        assert_eq!(format!("{url:?}"), "postgres://bob:***@db:5432/x");
        assert_eq!(url.scrub("bad s3cr%3Et here"), "bad *** here");
        assert_eq!(url.scrub("bad s3cr>t here"), "bad *** here");
    }

    #[test]
    fn query_passwords_never_show() {
        let url = DbUrl::parse(
            "state",
            "postgresql://bob@db:5432/x?sslmode=require&password=hunter%2B2&sslpassword=keypass&passfile=/home/bob/.pgpass&application_name=a%20b",
        )
        .unwrap();
        let shown = format!("{url:?}");
        assert_eq!(
            shown,
            "postgres://bob@db:5432/x?sslmode=require&password=***&sslpassword=***&passfile=***&application_name=a%20b"
        );
        assert_eq!(url.redacted(), shown);
        // Drivers may echo either spelling of a value.
        let scrubbed =
            url.scrub("password=hunter%2B2 / hunter+2 / sslpassword keypass / /home/bob/.pgpass");
        for secret in ["hunter", "keypass", ".pgpass"] {
            assert!(!scrubbed.contains(secret), "{scrubbed}");
        }
        // Both places at once, any case.
        let both = DbUrl::parse("state", "postgres://bob:s3cret@db/x?PASSWORD=other").unwrap();
        assert_eq!(both.redacted(), "postgres://bob:***@db/x?PASSWORD=***");
        assert_eq!(both.scrub("s3cret other"), "*** ***");
        // A parse error shows the URL masked.
        let err = DbUrl::parse("state", "postgres://bob@db:notaport/x?password=hunter2")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
