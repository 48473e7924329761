//! Process memory figures.

/// Peak resident set size of this process in bytes (`VmHWM`), where the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Current resident set size of this process in bytes (`VmRSS`), where the platform reports it.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU seconds this process has used (user + system), where the platform reports it.
/// (`/proc/self/stat` counts in clock ticks of 1/100 s on Linux.)
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Bytes of memory this process can still take: the kernel's estimate of what can be
/// allocated without swapping (`MemAvailable`), lowered to what the process's cgroup allows
/// (containers, systemd slices). `None` where the platform does not say.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let available = meminfo
        .as_deref()
        .and_then(|m| meminfo_kb(m, "MemAvailable:"));
    let cgroup = cgroup_room();
    match (available.map(|kb| kb * 1024), cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c).or_else(physical_bytes),
    }
}

fn meminfo_kb(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The memory limit of this process's cgroup (v2, or v1) minus what the group uses.
fn cgroup_room() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let num = |s: Option<String>| s.and_then(|t| t.trim().parse::<u64>().ok());
    // cgroup v2: the process's own group, from /proc/self/cgroup ("0::/path").
    if let Some(own) = read("/proc/self/cgroup").and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
    }) {
        let dir = format!("/sys/fs/cgroup{}", own.trim_end_matches('/'));
        for d in [dir.as_str(), "/sys/fs/cgroup"] {
            if let Some(limit) = num(read(&format!("{d}/memory.max"))) {
                let used = num(read(&format!("{d}/memory.current"))).unwrap_or(0);
                return Some(limit.saturating_sub(used));
            }
        }
    }
    // cgroup v1 (a limit of ~2^63 means none).
    let limit = num(read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))?;
    if limit >= 1 << 60 {
        return None;
    }
    let used = num(read("/sys/fs/cgroup/memory/memory.usage_in_bytes")).unwrap_or(0);
    Some(limit.saturating_sub(used))
}

/// The machine's physical memory (`sysconf`), the upper bound where nothing better is known.
fn physical_bytes() -> Option<u64> {
    // SAFETY: sysconf takes a constant and has no other preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && size > 0).then(|| pages as u64 * size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_lines_are_read_in_kb() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_kb(text, "MemAvailable:"), Some(20_000_000));
        assert_eq!(meminfo_kb(text, "Nope:"), None);
    }

    #[test]
    fn this_machine_reports_some_memory() {
        let a = available_bytes().expect("Linux and macOS report memory");
        assert!(a > 1 << 20, "{a}");
    }
}
