//! Small helpers the broker benchmarks share.

use std::time::{Duration, Instant};

/// Busy-waits for `d`: a handler's CPU-bound work, without yielding.
pub fn spin(d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// CPU time this process has used (user and system), from `/proc/self/stat`
/// (Linux; 10 ms ticks, so measure intervals of a second or more). Zero where
/// `/proc` is not readable.
pub fn cpu_time() -> Duration {
    cpu_of_stat(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default())
}

/// User plus system time of a `/proc/<pid>/stat` line.
fn cpu_of_stat(stat: &str) -> Duration {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// The median of some samples (the upper one of an even count); 0 for none.
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn cpu_time_reads_utime_and_stime() {
        // pid, a command name with a space and a parenthesis, then fields 3...
        let stat = "42 (my (bench) x) R 1 42 42 0 -1 4194304 100 0 0 0 250 30 0 0 20 0 3 0";
        assert_eq!(cpu_of_stat(stat), Duration::from_millis(2_800));
        assert_eq!(cpu_of_stat(""), Duration::ZERO);
    }
}
