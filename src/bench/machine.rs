//! What a benchmark ran on, recorded with every result: CPU model, cores, vector extensions,
//! caches, memory, OS, compiler, handgrad version and commit, date. And the envelope every
//! `handgrad bench ... --json` result is written in (one schema, versioned).

use serde::{Deserialize, Serialize};

/// The schema of benchmark result files.
pub const SCHEMA: &str = "handgrad-bench";
pub const SCHEMA_VERSION: u32 = 1;

/// The machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub cpu_model: String,
    /// Physical cores and hardware threads.
    pub cores: usize,
    pub threads: usize,
    /// The vector extensions that matter to handgrad's kernels.
    pub flags: Vec<String>,
    /// Per-core L1d / L2 and shared L3, bytes, as the OS reports them (0 when unknown).
    pub l1d_bytes: u64,
    pub l2_bytes: u64,
    pub l3_bytes: u64,
    pub memory_bytes: u64,
    pub os: String,
    pub rustc: String,
    pub handgrad_version: String,
    pub commit: String,
}

/// A result in its envelope: schema, the machine, when; the result's own fields (with its
/// backend and precision) stay at the top level, so readers of the bare results keep working.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub schema: String,
    pub schema_version: u32,
    /// `train`, `generate`, `matmul`, `memory`, `latency`.
    pub bench: String,
    pub machine: MachineInfo,
    pub date_unix: u64,
    #[serde(flatten)]
    pub result: T,
}

impl<T> Envelope<T> {
    pub fn new(bench: &str, result: T) -> Self {
        Envelope {
            schema: SCHEMA.into(),
            schema_version: SCHEMA_VERSION,
            bench: bench.into(),
            machine: MachineInfo::detect(),
            date_unix: crate::telemetry::events::unix_now() as u64,
            result,
        }
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A size in sysfs cache notation (`32K`, `1024K`, `32M`).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1u64 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1u64 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok().map(|n| n * mult)
}

/// Cache sizes of cpu0 from sysfs: (L1d, L2, L3).
fn caches() -> (u64, u64, u64) {
    let (mut l1, mut l2, mut l3) = (0, 0, 0);
    for i in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
        let level = read(&format!("{dir}/level"));
        let kind = read(&format!("{dir}/type"));
        let Some(size) = parse_size(&read(&format!("{dir}/size"))) else {
            continue;
        };
        match (level.trim(), kind.trim()) {
            ("1", "Data") => l1 = size,
            ("2", _) => l2 = size,
            ("3", _) => l3 = size,
            _ => {}
        }
    }
    (l1, l2, l3)
}

/// The OS in words: the distribution and kernel on Linux, the version on macOS.
pub fn os_description() -> String {
    if let Some(v) = std::process::Command::new("sw_vers")
        .arg("-productVersion")
        .output()
        .ok()
        .filter(|o| o.status.success())
    {
        return format!("macOS {}", String::from_utf8_lossy(&v.stdout).trim());
    }
    let pretty = read("/etc/os-release")
        .lines()
        .find(|l| l.starts_with("PRETTY_NAME="))
        .map(|l| l["PRETTY_NAME=".len()..].trim_matches('"').to_string());
    let kernel = read("/proc/sys/kernel/osrelease");
    match pretty {
        Some(p) => format!("{p} (Linux {})", kernel.trim()),
        None => format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
    }
}

/// The vector instruction sets of this CPU that the kernels use.
fn cpu_flags() -> Vec<String> {
    #[cfg(target_arch = "x86_64")]
    {
        [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            (
                "avx512bf16",
                std::arch::is_x86_feature_detected!("avx512bf16"),
            ),
            (
                "avx512vnni",
                std::arch::is_x86_feature_detected!("avx512vnni"),
            ),
            ("avxvnni", std::arch::is_x86_feature_detected!("avxvnni")),
        ]
        .into_iter()
        .filter(|&(_, on)| on)
        .map(|(name, _)| name.to_string())
        .collect()
    }
    #[cfg(target_arch = "aarch64")]
    {
        vec!["neon".to_string()]
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Vec::new()
    }
}

impl MachineInfo {
    /// This machine.
    pub fn detect() -> Self {
        let cpuinfo = read("/proc/cpuinfo");
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let cpu_model = field("model name")
            .or_else(|| {
                std::process::Command::new("sysctl")
                    .args(["-n", "machdep.cpu.brand_string"])
                    .output()
                    .ok()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let flags = cpu_flags();
        let memory_bytes = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        let (l1d_bytes, l2_bytes, l3_bytes) = caches();
        let os = os_description();
        MachineInfo {
            cpu_model,
            cores: num_cpus::get_physical(),
            threads: num_cpus::get(),
            flags,
            l1d_bytes,
            l2_bytes,
            l3_bytes,
            memory_bytes,
            os,
            rustc: env!("HANDGRAD_RUSTC").to_string(),
            handgrad_version: env!("CARGO_PKG_VERSION").to_string(),
            commit: env!("HANDGRAD_COMMIT").to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_sizes_parse() {
        assert_eq!(parse_size("32K\n"), Some(32 << 10));
        assert_eq!(parse_size("1024K"), Some(1 << 20));
        assert_eq!(parse_size("32M"), Some(32 << 20));
        assert_eq!(parse_size("x"), None);
    }

    #[test]
    fn the_envelope_keeps_the_result_fields_at_the_top() {
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct R {
            tokens_per_s: f64,
        }
        let e = Envelope::new("generate", R { tokens_per_s: 5.0 });
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["tokens_per_s"], 5.0);
        assert_eq!(v["schema"], SCHEMA);
        let back: Envelope<R> = serde_json::from_value(v).unwrap();
        assert_eq!(back.result, R { tokens_per_s: 5.0 });
        assert_eq!(back.machine, e.machine);
    }
}
