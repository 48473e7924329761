//! Power and energy, where the machine reports them: Linux's RAPL counters
//! (`/sys/class/powercap/intel-rapl:*`, package domains; AMD CPUs expose them too) when they are
//! readable, and Apple's `powermetrics` on macOS when it is permitted (it needs root). Anywhere
//! else there is no reading, and nothing is made up.

use std::path::PathBuf;
use std::time::Instant;

/// A source of cumulative energy.
pub enum PowerMeter {
    /// RAPL package domains: `(energy_uj file, max_energy_range_uj)`.
    Rapl(Vec<(PathBuf, u64)>, Vec<u64>),
    /// The latest power reading of a `powermetrics` process, integrated over time.
    #[cfg(target_os = "macos")]
    PowerMetrics(mac::Sampler),
}

fn read_u64(p: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

impl PowerMeter {
    /// A meter if this machine lets us read one.
    pub fn open() -> Option<Self> {
        if let Some(m) = Self::rapl() {
            return Some(m);
        }
        #[cfg(target_os = "macos")]
        if let Some(s) = mac::Sampler::start() {
            return Some(PowerMeter::PowerMetrics(s));
        }
        None
    }

    fn rapl() -> Option<Self> {
        Self::rapl_at(std::path::Path::new("/sys/class/powercap"))
    }

    /// RAPL package domains under a powercap folder (`/sys/class/powercap` on Linux).
    pub fn rapl_at(root: &std::path::Path) -> Option<Self> {
        let mut domains = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(root).ok()?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let dir = e.path();
            let name = std::fs::read_to_string(dir.join("name")).unwrap_or_default();
            if !name.trim().starts_with("package") {
                continue;
            }
            let energy = dir.join("energy_uj");
            let max = read_u64(&dir.join("max_energy_range_uj")).unwrap_or(u64::MAX);
            if read_u64(&energy).is_some() {
                domains.push((energy, max));
            }
        }
        if domains.is_empty() {
            return None;
        }
        let last = domains
            .iter()
            .map(|(p, _)| read_u64(p).unwrap_or(0))
            .collect();
        Some(PowerMeter::Rapl(domains, last))
    }

    /// What this meter reads, for the dashboard.
    pub fn source(&self) -> &'static str {
        match self {
            PowerMeter::Rapl(..) => "RAPL package energy",
            #[cfg(target_os = "macos")]
            PowerMeter::PowerMetrics(_) => "powermetrics (CPU + GPU + ANE)",
        }
    }

    /// Joules since the previous call.
    pub fn joules_since_last(&mut self) -> Option<f64> {
        match self {
            PowerMeter::Rapl(domains, last) => {
                let mut uj = 0u64;
                for ((p, max), prev) in domains.iter().zip(last.iter_mut()) {
                    let now = read_u64(p)?;
                    // The counter wraps at max_energy_range_uj.
                    uj += if now >= *prev {
                        now - *prev
                    } else {
                        now + max.saturating_sub(*prev)
                    };
                    *prev = now;
                }
                Some(uj as f64 / 1e6)
            }
            #[cfg(target_os = "macos")]
            PowerMeter::PowerMetrics(s) => s.joules_since_last(),
        }
    }
}

/// The total power in watts of one `powermetrics` text sample (`CPU Power: 1234 mW`, ...).
pub fn parse_powermetrics(text: &str) -> Option<f64> {
    let mut mw = None;
    for line in text.lines() {
        let l = line.trim();
        let value = l
            .strip_prefix("Combined Power (CPU + GPU + ANE):")
            .or_else(|| l.strip_prefix("Package Power:"));
        if let Some(v) = value {
            let n: f64 = v.trim().trim_end_matches("mW").trim().parse().ok()?;
            mw = Some(n);
        }
    }
    mw.map(|m| m / 1000.0)
}

/// A moment for integrating power readings.
pub fn now() -> Instant {
    Instant::now()
}

#[cfg(target_os = "macos")]
mod mac {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    /// A `powermetrics` process and its latest reading.
    pub struct Sampler {
        watts: Arc<Mutex<Option<f64>>>,
        last: Instant,
    }

    impl Sampler {
        /// Starts `powermetrics` when it runs without asking for a password.
        pub fn start() -> Option<Self> {
            let mut child = Command::new("powermetrics")
                .args(["--samplers", "cpu_power", "-i", "500"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            let out = child.stdout.take()?;
            let watts = Arc::new(Mutex::new(None));
            let w = watts.clone();
            std::thread::spawn(move || {
                let mut block = String::new();
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    block.push_str(&line);
                    block.push('\n');
                    if let Some(v) = super::parse_powermetrics(&block) {
                        if let Ok(mut g) = w.lock() {
                            *g = Some(v);
                        }
                        block.clear();
                    }
                }
                let _ = child.wait();
            });
            Some(Sampler {
                watts,
                last: Instant::now(),
            })
        }

        pub fn joules_since_last(&mut self) -> Option<f64> {
            let dt = self.last.elapsed().as_secs_f64();
            self.last = Instant::now();
            let w = (*self.watts.lock().ok()?)?;
            Some(w * dt)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_powermetrics_samples() {
        let text = "**** Processor usage ****\nCPU Power: 1234 mW\nGPU Power: 10 mW\nANE Power: 56 mW\nCombined Power (CPU + GPU + ANE): 1300 mW\n";
        assert_eq!(super::parse_powermetrics(text), Some(1.3));
        assert_eq!(super::parse_powermetrics("nothing"), None);
    }

    fn domain(root: &std::path::Path, name: &str, kind: &str, uj: u64, max: u64) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("name"), format!("{kind}\n")).unwrap();
        std::fs::write(d.join("energy_uj"), format!("{uj}\n")).unwrap();
        std::fs::write(d.join("max_energy_range_uj"), format!("{max}\n")).unwrap();
    }

    #[test]
    fn rapl_sums_package_domains_and_handles_wrap_around() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        domain(root, "intel-rapl:0", "package-0", 1_000_000, 10_000_000);
        domain(root, "intel-rapl:0:0", "core", 5, 10_000_000);
        domain(root, "intel-rapl:1", "package-1", 9_500_000, 10_000_000);
        let mut m = PowerMeter::rapl_at(root).unwrap();
        assert_eq!(m.source(), "RAPL package energy");
        // Package 0 advances 2 J; package 1 wraps: 0.5 J to the top, then 1 J.
        std::fs::write(root.join("intel-rapl:0/energy_uj"), "3000000").unwrap();
        std::fs::write(root.join("intel-rapl:0:0/energy_uj"), "999999999").unwrap();
        std::fs::write(root.join("intel-rapl:1/energy_uj"), "1000000").unwrap();
        let j = m.joules_since_last().unwrap();
        assert!((j - 3.5).abs() < 1e-9, "{j}");
        assert_eq!(m.joules_since_last(), Some(0.0));
    }

    #[test]
    fn no_readable_counters_means_no_meter() {
        let dir = tempfile::tempdir().unwrap();
        assert!(PowerMeter::rapl_at(dir.path()).is_none());
        assert!(PowerMeter::rapl_at(&dir.path().join("missing")).is_none());
        domain(dir.path(), "intel-rapl:0", "core", 1, 2);
        assert!(PowerMeter::rapl_at(dir.path()).is_none());
    }
}
