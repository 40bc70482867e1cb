//! Logs: stderr, plus seed 003's `LOG_FILE` with size rotation
//! (`LOG_MAX_BYTES`, `LOG_BACKUP_COUNT`: `server.log` → `server.log.1` → …,
//! the oldest dropped), at `LOG_LEVEL` (or `RETRAIN_LOG`, a tracing filter).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use retrain_adapters::settings::ServerLogSettings;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// A log file that rotates when a write would make it exceed `max_bytes`.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    backups: u32,
    file: File,
    size: u64,
}

impl RotatingFile {
    pub fn open(path: &Path, max_bytes: u64, backups: u32) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            max_bytes,
            backups,
            file,
            size,
        })
    }

    fn backup(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        if self.backups == 0 {
            self.file = File::create(&self.path)?;
        } else {
            let _ = std::fs::remove_file(self.backup(self.backups));
            for n in (1..self.backups).rev() {
                let from = self.backup(n);
                if from.exists() {
                    std::fs::rename(&from, self.backup(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.backup(1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.size > 0 && self.size + buf.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let written = self.file.write(buf)?;
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A shared [`RotatingFile`] for `tracing_subscriber`.
#[derive(Debug, Clone)]
struct SharedFile(Arc<Mutex<RotatingFile>>);

struct FileGuard<'a>(std::sync::MutexGuard<'a, RotatingFile>);

impl Write for FileGuard<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<'a> MakeWriter<'a> for SharedFile {
    type Writer = FileGuard<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        FileGuard(self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Install the subscriber: stderr always, the rotating file when set.
pub fn init(settings: &ServerLogSettings) -> io::Result<()> {
    let filter = || {
        EnvFilter::try_from_env("RETRAIN_LOG")
            .or_else(|_| EnvFilter::try_new(&settings.level))
            .unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let color = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(color)
        .with_filter(filter());
    let file = match &settings.file {
        Some(path) => {
            let file = RotatingFile::open(path, settings.max_bytes, settings.backup_count)?;
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(SharedFile(Arc::new(Mutex::new(file))))
                    .with_ansi(false)
                    .with_filter(filter()),
            )
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_rotates_by_size_and_keeps_backup_count_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/server.log");
        let mut file = RotatingFile::open(&path, 10, 2).unwrap();
        for line in ["aaaaaaaa\n", "bbbbbbbb\n", "cccccccc\n", "dddddddd\n"] {
            file.write_all(line.as_bytes()).unwrap();
        }
        file.flush().unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(path.clone()), "dddddddd\n");
        assert_eq!(read(dir.path().join("logs/server.log.1")), "cccccccc\n");
        assert_eq!(read(dir.path().join("logs/server.log.2")), "bbbbbbbb\n");
        assert!(!dir.path().join("logs/server.log.3").exists());
    }
}
