//! `ferry probe`: one TCP connection to an echo container, a request every few milliseconds,
//! every round trip recorded. Reports the largest gap between answers, the time spent above a
//! threshold, errors, and whether every byte came back in order with the server's counter
//! advancing by exactly one per line (the container's memory survived). Against the memory
//! workload (`ferry-workload mem`) every answer also carries the workload's own verdict on its
//! memory (`mem=ok` or `mem=bad`), which the report keeps.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Probe settings.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// Echo server.
    pub target: SocketAddr,
    /// Time between requests.
    pub interval: Duration,
    /// Stop after this long (None: wait for the stop file).
    pub duration: Option<Duration>,
    /// Stop when this file appears.
    pub stop_file: Option<PathBuf>,
    /// Gaps above this count towards `time_above_threshold_ms`.
    pub threshold: Duration,
    /// Keep every sample in the report.
    pub series: bool,
    /// After the stop, wait this long for answers still due (a connection recovering from TCP
    /// retransmission backoff may need up to two minutes).
    pub drain: Duration,
}

/// What the probe saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeReport {
    /// Target address.
    pub target: String,
    /// Request interval, ms.
    pub interval_ms: f64,
    /// Requests sent.
    pub sent: u64,
    /// Answers received.
    pub received: u64,
    /// Errors: connection failures, lost, duplicated or reordered answers, counter jumps.
    pub errors: u64,
    /// The first few errors, in words.
    pub error_messages: Vec<String>,
    /// Largest time between two consecutive answers, ms.
    pub max_gap_ms: f64,
    /// When that gap ended, ms after the probe started.
    pub max_gap_at_ms: f64,
    /// Sum of gaps longer than the threshold, ms.
    pub time_above_threshold_ms: f64,
    /// The threshold, ms.
    pub threshold_ms: f64,
    /// Median round trip, ms.
    pub rtt_p50_ms: f64,
    /// 99th percentile round trip, ms.
    pub rtt_p99_ms: f64,
    /// Largest round trip, ms.
    pub rtt_max_ms: f64,
    /// Server counter in the first answer.
    pub counter_first: u64,
    /// Server counter in the last answer.
    pub counter_last: u64,
    /// Every answer in order with the counter advancing by one each time.
    pub intact: bool,
    /// How long the probe ran, ms.
    pub duration_ms: f64,
    /// Wall-clock time the probe started, ms since the Unix epoch; series times are relative
    /// to it.
    #[serde(default)]
    pub started_unix_ms: f64,
    /// The memory workload's verdict in its last answer (`None` when the server is the plain
    /// echo workload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_intact: Option<bool>,
    /// (answer time ms, round trip ms) for every answer, when asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<(f64, f64)>,
}

/// Runs the probe to completion.
pub fn run(cfg: &ProbeConfig) -> Result<ProbeReport> {
    let stream = TcpStream::connect_timeout(&cfg.target, Duration::from_secs(3))
        .with_context(|| format!("cannot connect to the echo server at {}", cfg.target))?;
    stream.set_nodelay(true)?;
    let start = Instant::now();
    let started_unix_ms = ferry_runtime::util::unix_ms();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let write_failed = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut w = stream.try_clone()?;
        let (stop, sent, failed) = (
            Arc::clone(&stop),
            Arc::clone(&sent),
            Arc::clone(&write_failed),
        );
        let cfg = cfg.clone();
        std::thread::spawn(move || {
            let mut next = Instant::now();
            let mut seq = 0u64;
            loop {
                let stop_now = stop.load(Ordering::SeqCst)
                    || cfg.duration.is_some_and(|d| start.elapsed() >= d)
                    || cfg.stop_file.as_ref().is_some_and(|f| f.exists());
                if stop_now {
                    break;
                }
                let t_us = start.elapsed().as_micros();
                if w.write_all(format!("{seq} {t_us}\n").as_bytes()).is_err() {
                    failed.store(true, Ordering::SeqCst);
                    break;
                }
                seq += 1;
                sent.store(seq, Ordering::SeqCst);
                next += cfg.interval;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            stop.store(true, Ordering::SeqCst);
        })
    };

    let mut reader = BufReader::new(stream.try_clone()?);
    reader
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut r = Reader::new(cfg, start);
    // A read that times out keeps what it read in `line`: only a complete line is consumed.
    let mut line: Vec<u8> = Vec::new();
    let mut drain_deadline: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            let d = *drain_deadline.get_or_insert_with(|| Instant::now() + cfg.drain);
            if r.received >= sent.load(Ordering::SeqCst) || Instant::now() > d {
                break;
            }
        }
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => {
                r.error("connection closed by the server".into());
                break;
            }
            Ok(_) if line.ends_with(b"\n") => {
                r.answer(String::from_utf8_lossy(&line).trim_end());
                line.clear();
            }
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                r.error(format!("connection error: {e}"));
                break;
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let _ = writer.join();
    if write_failed.load(Ordering::SeqCst) {
        r.error("writing to the server failed".into());
    }
    let sent = sent.load(Ordering::SeqCst);
    if r.received < sent {
        r.error(format!("{} answers missing", sent - r.received));
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(r.finish(cfg, sent, start, started_unix_ms))
}

struct Reader {
    start: Instant,
    threshold: f64,
    keep_series: bool,
    received: u64,
    errors: u64,
    messages: Vec<String>,
    last_at: Option<f64>,
    max_gap: f64,
    max_gap_at: f64,
    above: f64,
    rtts: Vec<f64>,
    series: Vec<(f64, f64)>,
    counter_first: Option<u64>,
    counter_last: u64,
    memory_intact: Option<bool>,
}

impl Reader {
    fn new(cfg: &ProbeConfig, start: Instant) -> Self {
        Reader {
            start,
            threshold: ferry_runtime::util::ms(cfg.threshold),
            keep_series: cfg.series,
            received: 0,
            errors: 0,
            messages: vec![],
            last_at: None,
            max_gap: 0.0,
            max_gap_at: 0.0,
            above: 0.0,
            rtts: vec![],
            series: vec![],
            counter_first: None,
            counter_last: 0,
            memory_intact: None,
        }
    }

    fn error(&mut self, m: String) {
        self.errors += 1;
        if self.messages.len() < 10 {
            self.messages.push(m);
        }
    }

    fn answer(&mut self, line: &str) {
        let now = ferry_runtime::util::ms(self.start.elapsed());
        let mut it = line.split(' ');
        let parsed = (|| {
            let counter: u64 = it.next()?.parse().ok()?;
            let seq: u64 = it.next()?.parse().ok()?;
            let t_us: u64 = it.next()?.parse().ok()?;
            Some((counter, seq, t_us))
        })();
        let Some((counter, seq, t_us)) = parsed else {
            self.error(format!("garbled answer {line:?}"));
            return;
        };
        match it.next() {
            Some("mem=ok") => self.memory_intact = Some(true),
            Some("mem=bad") => {
                if self.memory_intact != Some(false) {
                    self.error(format!(
                        "the workload reports damaged memory in answer {seq}"
                    ));
                }
                self.memory_intact = Some(false);
            }
            _ => {}
        }
        if seq != self.received {
            self.error(format!(
                "answer for request {seq} where {} was due",
                self.received
            ));
        }
        match self.counter_first {
            None => self.counter_first = Some(counter),
            Some(_) if counter != self.counter_last + 1 => self.error(format!(
                "server counter jumped from {} to {counter}: its memory did not survive",
                self.counter_last
            )),
            Some(_) => {}
        }
        self.counter_last = counter;
        self.received += 1;
        let rtt = now - t_us as f64 / 1000.0;
        self.rtts.push(rtt);
        if self.keep_series {
            self.series.push((now, rtt));
        }
        if let Some(last) = self.last_at {
            let gap = now - last;
            if gap > self.max_gap {
                self.max_gap = gap;
                self.max_gap_at = now;
            }
            if gap > self.threshold {
                self.above += gap;
            }
        }
        self.last_at = Some(now);
    }

    fn finish(
        mut self,
        cfg: &ProbeConfig,
        sent: u64,
        start: Instant,
        started_unix_ms: f64,
    ) -> ProbeReport {
        self.rtts.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| -> f64 {
            if self.rtts.is_empty() {
                return 0.0;
            }
            let i = ((self.rtts.len() - 1) as f64 * p).round() as usize;
            self.rtts[i]
        };
        ProbeReport {
            target: cfg.target.to_string(),
            interval_ms: ferry_runtime::util::ms(cfg.interval),
            sent,
            received: self.received,
            errors: self.errors,
            error_messages: self.messages.clone(),
            max_gap_ms: self.max_gap,
            max_gap_at_ms: self.max_gap_at,
            time_above_threshold_ms: self.above,
            threshold_ms: self.threshold,
            rtt_p50_ms: pct(0.5),
            rtt_p99_ms: pct(0.99),
            rtt_max_ms: self.rtts.last().copied().unwrap_or(0.0),
            counter_first: self.counter_first.unwrap_or(0),
            counter_last: self.counter_last,
            intact: self.errors == 0 && self.received == sent,
            duration_ms: ferry_runtime::util::ms(start.elapsed()),
            started_unix_ms,
            memory_intact: self.memory_intact,
            series: std::mem::take(&mut self.series),
        }
    }
}
