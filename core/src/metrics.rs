//! Per-tenant usage, the parts that need no PostgreSQL: the latency histogram's fixed buckets and
//! the quantiles read from it, the token bucket of the statement rate limit, the classes errors
//! are counted by, and the Prometheus text exposition format (version 0.0.4).

/// Upper bounds of the latency histogram's buckets, in microseconds: a 1-2-5 series from 100 µs
/// to 60 s (each bucket 2 to 2.5 times the one before), then `+Inf`. Fixed, so that every tenant's
/// histogram, every scrape and every `rate()` over them agree.
pub const BUCKET_BOUNDS_US: [u64; 18] = [
    100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
    2_000_000, 5_000_000, 10_000_000, 20_000_000, 60_000_000,
];
/// Buckets including `+Inf`.
pub const BUCKETS: usize = BUCKET_BOUNDS_US.len() + 1;

/// The bucket a duration falls in (bounds are inclusive upper bounds, as Prometheus' `le`).
pub fn bucket_of(us: u64) -> usize {
    BUCKET_BOUNDS_US.iter().position(|&b| us <= b).unwrap_or(BUCKET_BOUNDS_US.len())
}

/// The `le` label of bucket `i`, in seconds.
pub fn le_label(i: usize) -> String {
    match BUCKET_BOUNDS_US.get(i) {
        Some(&us) => format_seconds(us),
        None => "+Inf".to_string(),
    }
}

fn format_seconds(us: u64) -> String {
    let whole = us / 1_000_000;
    let frac = us % 1_000_000;
    if frac == 0 {
        return whole.to_string();
    }
    let s = format!("{whole}.{frac:06}");
    s.trim_end_matches('0').to_string()
}

/// The `q` quantile (0 < q <= 1) of a histogram of per-bucket counts, in microseconds, as
/// Prometheus' `histogram_quantile` computes it: linear interpolation inside the bucket the rank
/// falls in (the first bucket starts at 0; a rank in `+Inf` answers the highest finite bound).
/// `None` for an empty histogram.
pub fn quantile_us(counts: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 || !(q > 0.0 && q <= 1.0) {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 && (below + c) as f64 >= rank {
            let Some(&upper) = BUCKET_BOUNDS_US.get(i) else {
                return Some(BUCKET_BOUNDS_US[BUCKET_BOUNDS_US.len() - 1] as f64);
            };
            let lower = if i == 0 { 0 } else { BUCKET_BOUNDS_US[i - 1] };
            let within = (rank - below as f64) / c as f64;
            return Some(lower as f64 + (upper - lower) as f64 * within);
        }
        below += c;
    }
    Some(BUCKET_BOUNDS_US[BUCKET_BOUNDS_US.len() - 1] as f64)
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up. State is two numbers so it
/// can live in shared memory under a spinlock.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bucket {
    pub tokens: f64,
    /// When `tokens` was last brought up to date, in microseconds; 0 = never used (a full bucket).
    pub at_us: i64,
}

impl Bucket {
    /// Take one token at `now_us` for a limit of `rate` per second and `burst`; whether one was
    /// there. A clock that went back adds nothing (and takes nothing).
    pub fn take(&mut self, now_us: i64, rate: f64, burst: f64) -> bool {
        let burst = burst.max(1.0);
        if self.at_us == 0 {
            self.tokens = burst;
        } else if now_us > self.at_us {
            let gained = (now_us - self.at_us) as f64 * rate / 1e6;
            self.tokens = (self.tokens + gained).min(burst);
        }
        if now_us > self.at_us {
            self.at_us = now_us;
        }
        // (a burst lowered since the last statement caps what was saved)
        self.tokens = self.tokens.min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The classes errors are counted by: the SQLSTATE classes an application meets most, and
/// `other`. The label is the class itself (the first two characters of the SQLSTATE).
pub const ERROR_CLASSES: [&str; 12] = ["22", "23", "25", "28", "40", "42", "53", "54", "55", "57", "XX", "other"];

/// The index in [`ERROR_CLASSES`] of a five-character SQLSTATE.
pub fn error_class(sqlstate: &str) -> usize {
    let class = sqlstate.get(..2).unwrap_or("");
    ERROR_CLASSES[..ERROR_CLASSES.len() - 1].iter().position(|&c| c == class).unwrap_or(ERROR_CLASSES.len() - 1)
}

/// A label value escaped as the text format requires (backslash, double quote, line feed).
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Builds a text exposition: each family's `# HELP` and `# TYPE` once, then its samples, families
/// in the order they are first declared.
#[derive(Default)]
pub struct Exposition {
    families: Vec<(String, String, &'static str, Vec<String>)>,
}

impl Exposition {
    /// Declare a family (a second declaration of the same name is ignored).
    pub fn family(&mut self, name: &str, kind: &'static str, help: &str) {
        if !self.families.iter().any(|f| f.0 == name) {
            self.families.push((name.to_string(), help.to_string(), kind, Vec::new()));
        }
    }

    /// One sample of family `family` (the sample's own name may carry a `_bucket`, `_sum` or
    /// `_count` suffix).
    pub fn sample(&mut self, family: &str, suffix: &str, labels: &[(&str, &str)], value: f64) {
        let line = format!("{family}{suffix}{} {}", render_labels(labels), render_value(value));
        if let Some(f) = self.families.iter_mut().find(|f| f.0 == family) {
            f.3.push(line);
        }
    }

    /// A histogram of per-bucket counts (not cumulative) and a sum in seconds: cumulative
    /// `_bucket` samples with `le` up to `+Inf`, then `_sum` and `_count`.
    pub fn histogram(&mut self, family: &str, labels: &[(&str, &str)], counts: &[u64; BUCKETS], sum_seconds: f64) {
        let mut cumulative = 0u64;
        for (i, &c) in counts.iter().enumerate() {
            cumulative += c;
            let le = le_label(i);
            let mut l: Vec<(&str, &str)> = labels.to_vec();
            l.push(("le", &le));
            self.sample(family, "_bucket", &l, cumulative as f64);
        }
        self.sample(family, "_sum", labels, sum_seconds);
        self.sample(family, "_count", labels, cumulative as f64);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, kind, lines) in &self.families {
            out.push_str(&format!("# HELP {name} {}\n# TYPE {name} {kind}\n", help.replace('\\', "\\\\").replace('\n', "\\n")));
            for l in lines {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape_label(v))).collect();
    format!("{{{}}}", inner.join(","))
}

fn render_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_inclusive_upper_bounds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(100), 0);
        assert_eq!(bucket_of(101), 1);
        assert_eq!(bucket_of(60_000_000), BUCKETS - 2);
        assert_eq!(bucket_of(60_000_001), BUCKETS - 1);
        assert_eq!(le_label(0), "0.0001");
        assert_eq!(le_label(3), "0.001");
        assert_eq!(le_label(12), "1");
        assert_eq!(le_label(13), "2");
        assert_eq!(le_label(BUCKETS - 1), "+Inf");
        // a 1-2-5 series: each bound 2 to 2.5 times the one before
        for w in BUCKET_BOUNDS_US.windows(2).take(BUCKET_BOUNDS_US.len() - 2) {
            let r = w[1] as f64 / w[0] as f64;
            assert!((2.0..=2.5).contains(&r), "{w:?}");
        }
    }

    #[test]
    fn quantiles_land_in_the_right_bucket() {
        let mut h = [0u64; BUCKETS];
        assert_eq!(quantile_us(&h, 0.99), None);
        // 90 statements of ~1 ms, 9 of ~50 ms, 1 of ~1.5 s
        h[bucket_of(900)] += 90;
        h[bucket_of(45_000)] += 9;
        h[bucket_of(1_500_000)] += 1;
        let p50 = quantile_us(&h, 0.5).unwrap();
        assert!(p50 > 500.0 && p50 <= 1_000.0, "{p50}");
        let p95 = quantile_us(&h, 0.95).unwrap();
        assert!(p95 > 20_000.0 && p95 <= 50_000.0, "{p95}");
        let p99 = quantile_us(&h, 0.99).unwrap();
        assert!(p99 > 20_000.0 && p99 <= 50_000.0, "{p99}");
        let p100 = quantile_us(&h, 1.0).unwrap();
        assert!(p100 > 1_000_000.0 && p100 <= 2_000_000.0, "{p100}");
        // all in +Inf: the highest finite bound
        let mut inf = [0u64; BUCKETS];
        inf[BUCKETS - 1] = 3;
        assert_eq!(quantile_us(&inf, 0.5), Some(60_000_000.0));
    }

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let mut b = Bucket::default();
        let t0 = 1_000_000_000;
        // a burst of 5 at once
        assert_eq!((0..10).filter(|_| b.take(t0, 10.0, 5.0)).count(), 5);
        // 10/s: one more every 100 ms
        assert!(!b.take(t0 + 50_000, 10.0, 5.0));
        assert!(b.take(t0 + 100_000, 10.0, 5.0));
        assert!(!b.take(t0 + 100_000, 10.0, 5.0));
        // a long pause saves up to the burst, no more
        assert_eq!((0..10).filter(|_| b.take(t0 + 100_000_000, 10.0, 5.0)).count(), 5);
        // a clock that goes back adds nothing
        assert!(!b.take(t0, 10.0, 5.0));
        // a limit raised applies at once, to the time since the last statement too: the
        // backlog of a slow rate is not kept (0.01/s would have refused for minutes)
        let mut b = Bucket::default();
        assert_eq!((0..5).filter(|_| b.take(t0, 0.01, 2.0)).count(), 2);
        assert!(!b.take(t0 + 1_000, 0.01, 2.0));
        assert_eq!((0..200).filter(|_| b.take(t0 + 101_000, 1000.0, 100.0)).count(), 100);
        // nor does the slowest rate lock a tenant out
        let mut b = Bucket::default();
        assert!(b.take(t0, 1e-9, 1.0));
        assert!(!b.take(t0, 1e-9, 1.0));
        assert!(b.take(t0 + 1_000, 1000.0, 1.0));
        // over one second at 10/s with burst 1: 10 or 11 statements
        let mut b = Bucket::default();
        let n = (0..=1000).filter(|ms| b.take(t0 + ms * 1000, 10.0, 1.0)).count();
        assert!((10..=11).contains(&n), "{n}");
    }

    #[test]
    fn error_classes() {
        assert_eq!(ERROR_CLASSES[error_class("23505")], "23");
        assert_eq!(ERROR_CLASSES[error_class("XX001")], "XX");
        assert_eq!(ERROR_CLASSES[error_class("P0001")], "other");
        assert_eq!(ERROR_CLASSES[error_class("")], "other");
    }

    #[test]
    fn exposition_format() {
        let mut e = Exposition::default();
        e.family("t_total", "counter", "Things.\nCounted");
        e.sample("t_total", "", &[("tenant", "a\"b\\c\nd")], 3.0);
        e.family("t_seconds", "histogram", "Time.");
        let mut h = [0u64; BUCKETS];
        h[0] = 1;
        h[BUCKETS - 1] = 2;
        e.histogram("t_seconds", &[("tenant", "x")], &h, 0.5);
        let text = e.render();
        assert!(text.starts_with("# HELP t_total Things.\\nCounted\n# TYPE t_total counter\n"), "{text}");
        assert!(text.contains("t_total{tenant=\"a\\\"b\\\\c\\nd\"} 3\n"), "{text}");
        assert!(text.contains("t_seconds_bucket{tenant=\"x\",le=\"0.0001\"} 1\n"));
        assert!(text.contains("t_seconds_bucket{tenant=\"x\",le=\"0.0002\"} 1\n"));
        assert!(text.contains("t_seconds_bucket{tenant=\"x\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("t_seconds_sum{tenant=\"x\"} 0.5\n"));
        assert!(text.contains("t_seconds_count{tenant=\"x\"} 3\n"));
    }
}
