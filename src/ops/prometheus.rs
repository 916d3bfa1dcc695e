//! The Prometheus text exposition format 0.0.4: a writer for metric families
//! and samples, a fixed-bucket histogram, and the standard `process_*` metrics.
//!
//! The format (Prometheus "Exposition formats", text 0.0.4): per family a
//! `# HELP name text` and a `# TYPE name counter|gauge|histogram` line, then
//! its samples, one per line: `name{label="value",...} number`. Counters are
//! named with `_total`; a histogram `h` is the series `h_bucket{le="..."}`
//! (cumulative, ending with `le="+Inf"`), `h_sum` and `h_count`.
//!
//! Metric and label names are chosen by this code, never by a peer; label
//! values and help texts may carry anything and are escaped here. Process
//! metrics carry the names the official client libraries give them, so
//! existing dashboards work: they are read on Linux only and are simply
//! absent elsewhere.

use std::fmt::Write;
use std::time::Duration;

/// The `Content-Type` of a response carrying this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bucket bounds in seconds for latencies from a millisecond to ten seconds
/// (the client libraries' defaults, shifted down one step: a relay's
/// latencies are loopback-to-internet round trips, not page renders).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What a family measures, as its `# TYPE` line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever goes up (restarts reset it); named `..._total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations counted into buckets ([`Histogram`]).
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample's value: integers are written exactly (a byte counter passes
/// 2^53 long before a float would notice), floats as Prometheus reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// An exact integer.
    Int(u64),
    /// A float; NaN and infinities are written `NaN`, `+Inf`, `-Inf`.
    Float(f64),
}

impl From<u64> for Value {
    fn from(n: u64) -> Value {
        Value::Int(n)
    }
}

impl From<usize> for Value {
    fn from(n: usize) -> Value {
        Value::Int(n as u64)
    }
}

impl From<u32> for Value {
    fn from(n: u32) -> Value {
        Value::Int(u64::from(n))
    }
}

impl From<f64> for Value {
    fn from(x: f64) -> Value {
        Value::Float(x)
    }
}

/// Builds one exposition, family by family.
#[derive(Debug, Default)]
pub struct TextWriter {
    out: String, // the exposition so far
}

impl TextWriter {
    /// An empty exposition.
    pub fn new() -> TextWriter {
        TextWriter::default()
    }

    /// The `# HELP` and `# TYPE` lines that start a family; its samples
    /// ([`TextWriter::sample`]) follow.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) {
        debug_assert!(is_metric_name(name), "bad metric name {name:?}");
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.name());
    }

    /// One sample of the current family: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Value>) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        self.out.push(' ');
        write_value(&mut self.out, value.into());
        self.out.push('\n');
    }

    /// A counter family with one unlabelled sample; `name` ends in `_total`.
    pub fn counter(&mut self, name: &str, help: &str, value: impl Into<Value>) {
        debug_assert!(name.ends_with("_total"), "counter {name:?} lacks _total");
        self.family(name, help, Kind::Counter);
        self.sample(name, &[], value);
    }

    /// A gauge family with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl Into<Value>) {
        self.family(name, help, Kind::Gauge);
        self.sample(name, &[], value);
    }

    /// Gauge families of one unlabelled sample each: (name, help, value).
    pub fn gauges(&mut self, gauges: &[(&str, &str, u64)]) {
        for &(name, help, value) in gauges {
            self.gauge(name, help, value);
        }
    }

    /// Counter families of one unlabelled sample each: (name, help, value).
    pub fn counters(&mut self, counters: &[(&str, &str, u64)]) {
        for &(name, help, value) in counters {
            self.counter(name, help, value);
        }
    }

    /// A family with one sample per value of a single label.
    pub fn by_label(
        &mut self,
        name: &str,
        help: &str,
        kind: Kind,
        label: &str,
        values: &[(&str, u64)],
    ) {
        self.family(name, help, kind);
        for &(value_of_label, value) in values {
            self.sample(name, &[(label, value_of_label)], value);
        }
    }

    /// A histogram family with one unlabelled series.
    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.family(name, help, Kind::Histogram);
        self.histogram_series(name, &[], histogram);
    }

    /// One labelled series of the current histogram family: its cumulative
    /// buckets, `+Inf` (equal to the count), the sum and the count.
    pub fn histogram_series(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0;
        for (bound, count) in h.bounds.iter().zip(&h.counts) {
            cumulative += count;
            self.bucket(name, labels, Value::Float(*bound), cumulative);
        }
        self.bucket(name, labels, Value::Float(f64::INFINITY), h.count);
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, h.count);
    }

    fn bucket(&mut self, name: &str, labels: &[(&str, &str)], le: Value, count: u64) {
        let _ = write!(self.out, "{name}_bucket");
        let mut bound = String::new();
        write_value(&mut bound, le);
        write_labels(&mut self.out, labels, Some(("le", &bound)));
        let _ = writeln!(self.out, " {count}");
    }

    /// The standard process metrics that could be read (none off Linux).
    pub fn process(&mut self, p: &ProcessMetrics) {
        if let Some(n) = p.open_fds {
            self.gauge("process_open_fds", "Number of open file descriptors.", n);
        }
        if let Some(n) = p.max_fds {
            let help = "Maximum number of open file descriptors.";
            self.gauge("process_max_fds", help, n);
        }
        if let Some(n) = p.resident_memory_bytes {
            let help = "Resident memory size in bytes.";
            self.gauge("process_resident_memory_bytes", help, n);
        }
        if let Some(n) = p.virtual_memory_bytes {
            let help = "Virtual memory size in bytes.";
            self.gauge("process_virtual_memory_bytes", help, n);
        }
        if let Some(x) = p.cpu_seconds {
            let help = "Total user and system CPU time spent in seconds.";
            self.counter("process_cpu_seconds_total", help, x);
        }
        if let Some(x) = p.start_time_seconds {
            let help = "Start time of the process since unix epoch in seconds.";
            self.gauge("process_start_time_seconds", help, x);
        }
    }

    /// The exposition text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// `{a="x",b="y"}`, with `extra` last (a histogram's `le`); nothing when
/// there are no labels at all.
fn write_labels(out: &mut String, labels: &[(&str, &str)], extra: Option<(&str, &str)>) {
    let mut all = labels.iter().copied().chain(extra).peekable();
    if all.peek().is_none() {
        return;
    }
    out.push('{');
    for (i, (name, value)) in all.enumerate() {
        debug_assert!(is_label_name(name), "bad label name {name:?}");
        let comma = if i == 0 { "" } else { "," };
        let _ = write!(out, "{comma}{name}=\"{}\"", escape_label_value(value));
    }
    out.push('}');
}

/// A value as Prometheus parses it (Go's `ParseFloat` plus its own
/// spellings of the infinities).
fn write_value(out: &mut String, value: Value) {
    let _ = match value {
        Value::Int(n) => write!(out, "{n}"),
        Value::Float(x) if x.is_nan() => write!(out, "NaN"),
        Value::Float(x) if x == f64::INFINITY => write!(out, "+Inf"),
        Value::Float(x) if x == f64::NEG_INFINITY => write!(out, "-Inf"),
        Value::Float(x) => write!(out, "{x}"),
    };
}

/// A label value escaped: backslash, double quote and line feed, the three
/// characters the format gives escapes to.
pub fn escape_label_value(value: &str) -> String {
    escape(value, true)
}

/// A help text escaped: backslash and line feed (quotes need none there).
fn escape_help(help: &str) -> String {
    escape(help, false)
}

fn escape(text: &str, quotes: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`, the format's metric names.
fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, the format's label names.
fn is_label_name(name: &str) -> bool {
    !name.contains(':') && is_metric_name(name)
}

/// Observations counted into fixed buckets, as a Prometheus histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: Vec<f64>, // bucket upper bounds, increasing, finite
    counts: Vec<u64>, // observations per bucket, not cumulative (one per bound)
    sum: f64,         // sum of all observations
    count: u64,       // all observations, those above the last bound too
}

impl Histogram {
    /// A histogram with buckets up to each of `bounds` (then `+Inf`), e.g.
    /// [`LATENCY_BUCKETS`]. Bounds are sorted; duplicates and non-finite
    /// ones are dropped (`+Inf` is always there).
    pub fn new(bounds: &[f64]) -> Histogram {
        let mut bounds: Vec<f64> = bounds.iter().copied().filter(|b| b.is_finite()).collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        Histogram {
            counts: vec![0; bounds.len()],
            bounds,
            sum: 0.0,
            count: 0,
        }
    }

    /// Counts a duration, in seconds.
    pub fn observe(&mut self, duration: Duration) {
        self.observe_value(duration.as_secs_f64());
    }

    /// Counts a value into the first bucket whose bound is at least it
    /// (`le` means less than or equal). NaN is ignored.
    pub fn observe_value(&mut self, value: f64) {
        if value.is_nan() {
            return;
        }
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        if let Some(count) = self.counts.get_mut(bucket) {
            *count += 1;
        }
        self.sum += value;
        self.count += 1;
    }
}

/// The standard process metrics; a field is `None` when it could not be
/// read (always, off Linux).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessMetrics {
    /// Descriptors open now (`process_open_fds`).
    pub open_fds: Option<u64>,
    /// The soft descriptor limit (`process_max_fds`).
    pub max_fds: Option<u64>,
    /// Resident set size in bytes (`process_resident_memory_bytes`).
    pub resident_memory_bytes: Option<u64>,
    /// Virtual memory size in bytes (`process_virtual_memory_bytes`).
    pub virtual_memory_bytes: Option<u64>,
    /// User plus system CPU time (`process_cpu_seconds_total`).
    pub cpu_seconds: Option<f64>,
    /// Start time in seconds since the Unix epoch (`process_start_time_seconds`).
    pub start_time_seconds: Option<f64>,
}

impl ProcessMetrics {
    /// This process's metrics, now.
    pub fn read() -> ProcessMetrics {
        #[cfg(target_os = "linux")]
        {
            linux::read()
        }
        #[cfg(not(target_os = "linux"))]
        {
            ProcessMetrics::default()
        }
    }
}

#[cfg(target_os = "linux")]
mod linux {
    //! Process metrics from `/proc/self` (proc(5)) and two libc calls.

    use super::ProcessMetrics;

    pub(super) fn read() -> ProcessMetrics {
        let page = sysconf(libc::_SC_PAGESIZE);
        let ticks = sysconf(libc::_SC_CLK_TCK).map(|t| t as f64);
        let statm = std::fs::read_to_string("/proc/self/statm").ok();
        let statm = statm.as_deref().and_then(parse_statm);
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let stat = stat.as_deref().and_then(parse_stat);
        ProcessMetrics {
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.count() as u64),
            max_fds: max_fds(),
            resident_memory_bytes: statm.zip(page).map(|((_, rss), page)| rss * page),
            virtual_memory_bytes: statm.zip(page).map(|((size, _), page)| size * page),
            cpu_seconds: stat.zip(ticks).map(|(s, t)| (s.utime + s.stime) as f64 / t),
            start_time_seconds: stat
                .zip(ticks)
                .zip(boot_time())
                .map(|((s, t), boot)| boot + s.starttime as f64 / t),
        }
    }

    /// The fields of `/proc/self/stat` used here, in clock ticks.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) struct Stat {
        pub(super) utime: u64,     // field 14: user time
        pub(super) stime: u64,     // field 15: system time
        pub(super) starttime: u64, // field 22: start, since boot
    }

    /// Parses `/proc/self/stat`. The command name (field 2) is in
    /// parentheses and may itself hold spaces and `)`, so fields are counted
    /// from the last `)`: the one after it is field 3.
    pub(super) fn parse_stat(text: &str) -> Option<Stat> {
        let (_, rest) = text.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            starttime: field(22)?,
        })
    }

    /// Parses `/proc/self/statm`: total program size and resident set size,
    /// both in pages.
    pub(super) fn parse_statm(text: &str) -> Option<(u64, u64)> {
        let mut fields = text.split_whitespace().map(|f| f.parse().ok());
        Some((fields.next()??, fields.next()??))
    }

    fn sysconf(name: libc::c_int) -> Option<u64> {
        // SAFETY: sysconf reads a system constant; no memory is passed.
        let value = unsafe { libc::sysconf(name) };
        u64::try_from(value).ok().filter(|&v| v > 0)
    }

    fn max_fds() -> Option<u64> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct we pass.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
        ok.then_some(limit.rlim_cur)
    }

    /// When the machine booted, in seconds since the epoch: the wall clock
    /// less the time since boot (`CLOCK_BOOTTIME`, which like the start time
    /// in `stat` counts suspended time). Not `/proc/stat`'s `btime`: units
    /// with `ProcSubset=pid` cannot see `/proc/stat`.
    fn boot_time() -> Option<f64> {
        let since_boot = clock(libc::CLOCK_BOOTTIME)?;
        let now = clock(libc::CLOCK_REALTIME)?;
        Some(now - since_boot)
    }

    fn clock(id: libc::clockid_t) -> Option<f64> {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime only writes the struct we pass.
        let ok = unsafe { libc::clock_gettime(id, &mut t) } == 0;
        ok.then(|| t.tv_sec as f64 + t.tv_nsec as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_have_help_type_and_a_sample() {
        let mut w = TextWriter::new();
        w.counter("tcp_relay_clients_total", "Clients accepted.", 42u64);
        w.gauge("tcp_relay_apps", "Apps registered.\nNow.", 3usize);
        w.gauge("tcp_relay_load", "A \\ float.", 0.25);
        assert_eq!(
            w.finish(),
            "# HELP tcp_relay_clients_total Clients accepted.\n\
             # TYPE tcp_relay_clients_total counter\n\
             tcp_relay_clients_total 42\n\
             # HELP tcp_relay_apps Apps registered.\\nNow.\n\
             # TYPE tcp_relay_apps gauge\n\
             tcp_relay_apps 3\n\
             # HELP tcp_relay_load A \\\\ float.\n\
             # TYPE tcp_relay_load gauge\n\
             tcp_relay_load 0.25\n"
        );
    }

    #[test]
    fn labelled_series_escape_their_values() {
        let mut w = TextWriter::new();
        w.family("tcp_relay_app_bytes_total", "Bytes per app.", Kind::Counter);
        let weird = "a\\b\"c\nd";
        w.sample(
            "tcp_relay_app_bytes_total",
            &[("port", "8081"), ("dir", "in")],
            7u64,
        );
        w.sample("tcp_relay_app_bytes_total", &[("addr", weird)], u64::MAX);
        let text = w.finish();
        assert!(text.contains("tcp_relay_app_bytes_total{port=\"8081\",dir=\"in\"} 7\n"));
        assert!(text.contains("{addr=\"a\\\\b\\\"c\\nd\"} 18446744073709551615\n"));
        assert_eq!(
            text.lines().count(),
            4,
            "no raw newline escaped into a line"
        );
    }

    #[test]
    fn special_floats_are_spelled_as_prometheus_reads_them() {
        let spell = |x: f64| {
            let mut s = String::new();
            write_value(&mut s, Value::Float(x));
            s
        };
        assert_eq!(spell(f64::NAN), "NaN");
        assert_eq!(spell(f64::INFINITY), "+Inf");
        assert_eq!(spell(f64::NEG_INFINITY), "-Inf");
        assert_eq!(spell(1.0), "1");
        assert_eq!(spell(0.005), "0.005");
        assert_eq!(spell(-2.5), "-2.5");
    }

    #[test]
    fn histograms_are_cumulative_and_end_with_inf_sum_and_count() {
        let mut h = Histogram::new(&[1.0, 0.1, 0.5, 0.5, f64::INFINITY, f64::NAN]);
        // Binary fractions, so the sum is exact; 0.5 lands in `le="0.5"`.
        for us in [62_500, 250_000, 500_000, 2_000_000] {
            h.observe(Duration::from_micros(us));
        }
        h.observe_value(f64::NAN);
        let mut w = TextWriter::new();
        w.histogram("tcp_relay_dial_in_seconds", "Time to dial in.", &h);
        assert_eq!(
            w.finish(),
            "# HELP tcp_relay_dial_in_seconds Time to dial in.\n\
             # TYPE tcp_relay_dial_in_seconds histogram\n\
             tcp_relay_dial_in_seconds_bucket{le=\"0.1\"} 1\n\
             tcp_relay_dial_in_seconds_bucket{le=\"0.5\"} 3\n\
             tcp_relay_dial_in_seconds_bucket{le=\"1\"} 3\n\
             tcp_relay_dial_in_seconds_bucket{le=\"+Inf\"} 4\n\
             tcp_relay_dial_in_seconds_sum 2.8125\n\
             tcp_relay_dial_in_seconds_count 4\n"
        );
    }

    #[test]
    fn labelled_histograms_put_le_last() {
        let mut h = Histogram::new(&[1.0]);
        h.observe(Duration::from_secs(1));
        let mut w = TextWriter::new();
        w.histogram_series("x_seconds", &[("port", "1")], &h);
        let text = w.finish();
        assert!(
            text.starts_with("x_seconds_bucket{port=\"1\",le=\"1\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("x_seconds_count{port=\"1\"} 1\n"), "{text}");
    }

    #[test]
    fn names_are_checked_against_the_format() {
        assert!(is_metric_name("process_cpu_seconds_total"));
        assert!(is_metric_name("a:b_c9"));
        assert!(!is_metric_name("9a") && !is_metric_name("") && !is_metric_name("a-b"));
        assert!(is_label_name("le") && !is_label_name("a:b"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn proc_stat_is_parsed_from_the_last_parenthesis() {
        let line = "1234 (tcp) relay) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 1 0 9000 12345678 321 18446744073709551615";
        let stat = linux::parse_stat(line).expect("a stat line");
        assert_eq!((stat.utime, stat.stime, stat.starttime), (250, 75, 9000));
        assert_eq!(linux::parse_stat("1234 (short) S 1"), None);
        assert_eq!(linux::parse_stat("no parenthesis"), None);
        assert_eq!(
            linux::parse_statm("2000 300 100 1 0 500 0\n"),
            Some((2000, 300))
        );
        assert_eq!(linux::parse_statm("2000"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reports_every_metric() {
        let p = ProcessMetrics::read();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_secs_f64();
        assert!(p.open_fds.expect("open fds") >= 3, "stdio at least");
        assert!(p.max_fds.expect("max fds") >= p.open_fds.unwrap_or(0));
        let rss = p.resident_memory_bytes.expect("rss");
        assert!(rss > 0 && rss <= p.virtual_memory_bytes.expect("vsize"));
        assert!(p.cpu_seconds.expect("cpu") >= 0.0);
        let start = p.start_time_seconds.expect("start time");
        assert!(
            start > wall - 86400.0 * 365.0 && start <= wall + 1.0,
            "{start} vs {wall}"
        );
        let mut w = TextWriter::new();
        w.process(&p);
        let text = w.finish();
        for name in [
            "process_open_fds ",
            "process_max_fds ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(&format!("\n{name}")), "{name} in {text}");
        }
    }
}
