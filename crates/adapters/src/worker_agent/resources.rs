//! What a worker offers: detected at start (CPU cores, memory, NVIDIA GPUs)
//! and overridable with `--resources gpu=2,gpu_memory=80G,...`.
//!
//! Sizes use binary units (`K` = 1024 bytes, `G` = 2^30): `nvidia-smi`
//! reports MiB, so an "80GB" A100 (81920 MiB) is exactly `80G`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::AgentError;

/// The resources object of the worker HTTP contract.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub gpus: u32,
    /// Per GPU (the smallest one's when they differ); 0 without GPUs.
    pub gpu_memory_bytes: u64,
    #[serde(default)]
    pub gpu_names: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// One GPU as `nvidia-smi` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    pub name: String,
    pub memory_bytes: u64,
}

/// `--resources` values; `None` keeps what was detected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceOverrides {
    pub cpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub gpus: Option<u32>,
    pub gpu_memory_bytes: Option<u64>,
    pub tags: Vec<String>,
}

impl ResourceOverrides {
    /// Parse `key=value` pairs separated by commas. Keys: `cpus`, `memory`,
    /// `gpu` (or `gpus`), `gpu_memory`, `tags` (repeatable; one tag each, or
    /// several joined by `+`). Errors name the key and what was expected.
    pub fn parse(raw: &str) -> Result<Self, AgentError> {
        let mut out = Self::default();
        let mut seen: Vec<&str> = Vec::new();
        for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(invalid(pair, "expected key=value"));
            };
            let (key, value) = (key.trim(), value.trim());
            let canonical = match key {
                "gpus" => "gpu",
                "tag" => "tags",
                other => other,
            };
            if canonical != "tags" && seen.contains(&canonical) {
                return Err(invalid(key, "is given twice"));
            }
            seen.push(canonical);
            match canonical {
                "cpus" => out.cpus = Some(parse_count(key, value, true)?),
                "gpu" => out.gpus = Some(parse_count(key, value, false)?),
                "memory" => {
                    out.memory_bytes = Some(parse_size(value).map_err(|e| invalid(key, &e))?)
                }
                "gpu_memory" => {
                    out.gpu_memory_bytes = Some(parse_size(value).map_err(|e| invalid(key, &e))?)
                }
                "tags" => {
                    for tag in value.split('+') {
                        if !is_tag(tag) {
                            return Err(invalid(
                                key,
                                &format!("{tag:?} is not a tag: use 1-64 characters of A-Z a-z 0-9 . _ -"),
                            ));
                        }
                        if !out.tags.iter().any(|t| t == tag) {
                            out.tags.push(tag.to_owned());
                        }
                    }
                }
                _ => {
                    return Err(invalid(
                        key,
                        "is not a resource: use cpus, memory, gpu, gpu_memory or tags",
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Whether GPU detection is needed at all (both GPU keys overridden: no).
    pub fn needs_gpu_detection(&self) -> bool {
        self.gpus.is_none() || self.gpu_memory_bytes.is_none()
    }

    /// `detected` with these overrides applied. Declaring `gpu=0` clears the
    /// GPU memory and names too.
    pub fn apply(&self, mut detected: Resources) -> Resources {
        if let Some(cpus) = self.cpus {
            detected.cpus = cpus;
        }
        if let Some(memory) = self.memory_bytes {
            detected.memory_bytes = memory;
        }
        if let Some(gpus) = self.gpus {
            if gpus as usize != detected.gpu_names.len() {
                detected.gpu_names.clear();
            }
            detected.gpus = gpus;
        }
        if let Some(gpu_memory) = self.gpu_memory_bytes {
            detected.gpu_memory_bytes = gpu_memory;
        }
        if detected.gpus == 0 {
            detected.gpu_memory_bytes = 0;
            detected.gpu_names.clear();
        }
        for tag in &self.tags {
            if !detected.tags.contains(tag) {
                detected.tags.push(tag.clone());
            }
        }
        detected
    }
}

fn invalid(key: &str, why: &str) -> AgentError {
    AgentError::Config(format!("--resources: `{key}` {why}"))
}

fn parse_count(key: &str, value: &str, positive: bool) -> Result<u32, AgentError> {
    match value.parse::<u32>() {
        Ok(0) if positive => Err(invalid(key, "must be at least 1")),
        Ok(n) => Ok(n),
        Err(_) => Err(invalid(
            key,
            &format!("must be a whole number, got {value:?}"),
        )),
    }
}

fn is_tag(tag: &str) -> bool {
    (1..=64).contains(&tag.len())
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Parse a size: bytes (`1073741824`) or a number with a binary unit
/// (`512M`, `80G`, `80GB`, `80Gi`, `1.5T`; case-insensitive).
pub fn parse_size(raw: &str) -> Result<u64, String> {
    let text = raw.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("must be a size such as 512M, 80G or 1T, got {raw:?}"))?;
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit
        .strip_suffix("IB")
        .or_else(|| unit.strip_suffix('B'))
        .or_else(|| unit.strip_suffix('I'))
        .unwrap_or(&unit);
    let scale: u64 = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => {
            return Err(format!(
                "has an unknown unit in {raw:?} (use K, M, G or T; binary, 1G = 1024^3 bytes)"
            ))
        }
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("is too large: {raw:?}"));
    }
    Ok(bytes.round() as u64)
}

/// `MemTotal` of `/proc/meminfo` in bytes.
pub fn parse_meminfo(text: &str) -> Result<u64, String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .ok_or("has no MemTotal line")?;
    let mut fields = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = fields
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("has an unreadable MemTotal line {line:?}"))?;
    match fields.next() {
        Some("kB") => Ok(kib * 1024),
        _ => Err(format!("has a MemTotal line without kB: {line:?}")),
    }
}

/// Parse `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`:
/// one `name, MiB` line per GPU. Strict: any other line is an error.
pub fn parse_nvidia_smi(output: &str) -> Result<Vec<Gpu>, String> {
    let mut gpus = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // Names may contain commas in theory; the memory is the last field.
        let Some((name, memory)) = line.rsplit_once(',') else {
            return Err(format!(
                "unexpected nvidia-smi line {line:?}: expected `name, MiB`"
            ));
        };
        let name = name.trim();
        let mib: u64 = memory.trim().parse().map_err(|_| {
            format!("unexpected nvidia-smi line {line:?}: memory.total is not a number of MiB")
        })?;
        if name.is_empty() {
            return Err(format!(
                "unexpected nvidia-smi line {line:?}: empty GPU name"
            ));
        }
        gpus.push(Gpu {
            name: name.to_owned(),
            memory_bytes: mib * (1 << 20),
        });
    }
    Ok(gpus)
}

/// Resources from detected parts (the smallest GPU's memory is per GPU).
pub fn assemble(cpus: u32, memory_bytes: u64, gpus: &[Gpu]) -> Resources {
    Resources {
        cpus,
        memory_bytes,
        gpus: gpus.len() as u32,
        gpu_memory_bytes: gpus.iter().map(|g| g.memory_bytes).min().unwrap_or(0),
        gpu_names: gpus.iter().map(|g| g.name.clone()).collect(),
        tags: Vec::new(),
    }
}

/// `program` on `$PATH`, if any.
fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// GPUs as `nvidia-smi` reports them: none when it is not installed or
/// reports no device; an error when it answers something unreadable.
async fn detect_gpus() -> Result<Vec<Gpu>, AgentError> {
    let Some(program) = find_on_path("nvidia-smi") else {
        return Ok(Vec::new());
    };
    let run = tokio::process::Command::new(&program)
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => {
            return Err(AgentError::Config(format!(
                "cannot run {}: {e}; declare the GPUs with --resources gpu=N,gpu_memory=SIZE",
                program.display()
            )))
        }
        Err(_) => {
            return Err(AgentError::Config(format!(
            "{} did not answer within 30s; declare the GPUs with --resources gpu=N,gpu_memory=SIZE",
            program.display()
        )))
        }
    };
    if !output.status.success() {
        // Installed without a working driver (or no device): no usable GPU.
        tracing::warn!(
            status = %output.status,
            "nvidia-smi failed; registering without GPUs (declare them with --resources gpu=N,gpu_memory=SIZE)"
        );
        return Ok(Vec::new());
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&output.stdout)).map_err(|e| {
        AgentError::Config(format!(
            "{e}; declare the GPUs with --resources gpu=N,gpu_memory=SIZE"
        ))
    })
}

/// Detect this machine's resources, then apply `overrides`.
pub async fn detect(overrides: &ResourceOverrides) -> Result<Resources, AgentError> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_bytes = match std::fs::read_to_string("/proc/meminfo") {
        Ok(text) => parse_meminfo(&text).map_err(|e| {
            AgentError::Config(format!(
                "/proc/meminfo {e}; declare --resources memory=SIZE"
            ))
        })?,
        Err(_) if overrides.memory_bytes.is_some() => 0,
        Err(e) => {
            return Err(AgentError::Config(format!(
                "cannot read /proc/meminfo ({e}); declare --resources memory=SIZE"
            )))
        }
    };
    let gpus = if overrides.needs_gpu_detection() {
        detect_gpus().await?
    } else {
        Vec::new()
    };
    Ok(overrides.apply(assemble(cpus, memory_bytes, &gpus)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn nvidia_smi_lines_are_parsed_strictly() {
        let two = "NVIDIA A100-SXM4-80GB, 81920\nNVIDIA A100-SXM4-40GB, 40960\n";
        let gpus = parse_nvidia_smi(two).unwrap();
        assert_eq!(
            gpus,
            vec![
                Gpu {
                    name: "NVIDIA A100-SXM4-80GB".into(),
                    memory_bytes: 80 * GIB
                },
                Gpu {
                    name: "NVIDIA A100-SXM4-40GB".into(),
                    memory_bytes: 40 * GIB
                },
            ]
        );
        let resources = assemble(16, 256 * GIB, &gpus);
        assert_eq!(resources.gpus, 2);
        assert_eq!(
            resources.gpu_memory_bytes,
            40 * GIB,
            "the smallest GPU counts"
        );
        assert_eq!(parse_nvidia_smi("").unwrap(), vec![]);
        // Units left in (`--format=csv` without nounits), a header, junk.
        for bad in [
            "NVIDIA A100, 81920 MiB",
            "name, memory.total [MiB]",
            "No devices were found",
            ", 1024",
        ] {
            let err = parse_nvidia_smi(bad).unwrap_err();
            assert!(err.contains("unexpected nvidia-smi line"), "{bad}: {err}");
        }
        assert_eq!(assemble(4, GIB, &[]).gpu_memory_bytes, 0);
    }

    #[test]
    fn meminfo_total_is_read_in_bytes() {
        let text = "MemTotal:       16318480 kB\nMemFree:         1018420 kB\n";
        assert_eq!(parse_meminfo(text).unwrap(), 16318480 * 1024);
        assert!(parse_meminfo("MemFree: 1 kB")
            .unwrap_err()
            .contains("MemTotal"));
        assert!(parse_meminfo("MemTotal: lots").is_err());
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(parse_size("80G").unwrap(), 80 * GIB);
        assert_eq!(parse_size("80GB").unwrap(), 80 * GIB);
        assert_eq!(parse_size("80gi").unwrap(), 80 * GIB);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5T").unwrap(), 3 << 39);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("80X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn overrides_are_validated_and_name_the_key() {
        let o =
            ResourceOverrides::parse("gpu=2,gpu_memory=80G,memory=256G,cpus=16,tags=a100").unwrap();
        assert_eq!(
            o,
            ResourceOverrides {
                cpus: Some(16),
                memory_bytes: Some(256 * GIB),
                gpus: Some(2),
                gpu_memory_bytes: Some(80 * GIB),
                tags: vec!["a100".into()],
            }
        );
        assert!(!o.needs_gpu_detection());
        let tags = ResourceOverrides::parse("tags=a100+nvlink, tag=spot").unwrap();
        assert_eq!(tags.tags, ["a100", "nvlink", "spot"]);
        assert!(tags.needs_gpu_detection());
        for (raw, key) in [
            ("gpu=two", "`gpu`"),
            ("cpus=0", "`cpus`"),
            ("memory=lots", "`memory`"),
            ("gpu_memory=8Q", "`gpu_memory`"),
            ("tags=a b", "`tags`"),
            ("disk=1T", "`disk` is not a resource"),
            ("gpu", "`gpu` expected key=value"),
            ("gpu=1,gpus=2", "`gpus` is given twice"),
        ] {
            let err = ResourceOverrides::parse(raw).unwrap_err().to_string();
            assert!(err.contains(key), "{raw}: {err}");
        }
    }

    #[test]
    fn overrides_replace_detected_values() {
        let detected = assemble(
            8,
            32 * GIB,
            &[Gpu {
                name: "NVIDIA L4".into(),
                memory_bytes: 24 * GIB,
            }],
        );
        let none = ResourceOverrides::parse("gpu=0,tags=cpu-only").unwrap();
        let cleared = none.apply(detected.clone());
        assert_eq!(
            (
                cleared.gpus,
                cleared.gpu_memory_bytes,
                cleared.gpu_names.len()
            ),
            (0, 0, 0)
        );
        assert_eq!(cleared.tags, ["cpu-only"]);
        let more = ResourceOverrides::parse("memory=64G")
            .unwrap()
            .apply(detected);
        assert_eq!(more.memory_bytes, 64 * GIB);
        assert_eq!(more.gpu_names, ["NVIDIA L4"]);
    }
}
