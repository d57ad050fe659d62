//! The load generator: `concurrency` tasks sharing one keep-alive HTTP/1.1 client, each
//! taking the next request number until `requests` have been sent, timing every request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::Serialize;

pub const NON_STREAM_BODY: &str = r#"{"model":"bench-model","messages":[{"role":"user","content":"Say hello to the benchmark"}]}"#;
pub const STREAM_BODY: &str = r#"{"model":"bench-model","messages":[{"role":"user","content":"Say hello to the benchmark"}],"stream":true}"#;

/// The end of every OpenAI stream.
const DONE: &[u8] = b"data: [DONE]";
/// Bytes of a stream's end kept to look for `data: [DONE]` (it is the last event).
const TAIL: usize = 256;

/// One client for the whole run: HTTP/1.1 keep-alive, Nagle off, no proxy from the env.
pub fn client(max_concurrency: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .no_proxy()
        .pool_max_idle_per_host(max_concurrency.max(1) * 2)
        .timeout(Duration::from_secs(60))
        .build()?)
}

/// Where and what to send.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub authorization: String,
    pub stream: bool,
}

/// Timings of one successful request, in microseconds.
#[derive(Debug, Clone, Copy)]
struct Sample {
    total_us: u32,
    ttfb_us: u32,
}

/// What one load phase measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub ok: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Sorted total latencies of the successful requests, µs.
    total_us: Vec<u32>,
    /// Sorted times to first byte of the successful requests, µs.
    ttfb_us: Vec<u32>,
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl LoadResult {
    /// Successful requests per second of wall time.
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }

    pub fn latency(&self) -> Percentiles {
        percentiles(&self.total_us)
    }

    pub fn ttfb(&self) -> Percentiles {
        percentiles(&self.ttfb_us)
    }
}

/// Nearest-rank percentiles of sorted microsecond samples.
pub fn percentiles(sorted: &[u32]) -> Percentiles {
    if sorted.is_empty() {
        return Percentiles {
            p50_ms: f64::NAN,
            p90_ms: f64::NAN,
            p99_ms: f64::NAN,
            max_ms: f64::NAN,
            mean_ms: f64::NAN,
        };
    }
    let at = |q: f64| -> f64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        f64::from(sorted[rank - 1]) / 1000.0
    };
    let sum: u64 = sorted.iter().map(|&v| u64::from(v)).sum();
    Percentiles {
        p50_ms: at(0.50),
        p90_ms: at(0.90),
        p99_ms: at(0.99),
        max_ms: at(1.0),
        mean_ms: sum as f64 / sorted.len() as f64 / 1000.0,
    }
}

/// Sends `requests` requests over `concurrency` tasks and waits for all of them.
pub async fn run(
    client: &reqwest::Client,
    target: &Target,
    requests: usize,
    concurrency: usize,
) -> LoadResult {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.max(1) {
        let client = client.clone();
        let target = target.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(requests / concurrency.max(1) + 1);
            let mut errors = 0usize;
            let mut first_error = None;
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                match one(&client, &target).await {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (samples, errors, first_error)
        }));
    }
    let mut samples = Vec::with_capacity(requests);
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok((s, e, f)) => {
                samples.extend(s);
                errors += e;
                if first_error.is_none() {
                    first_error = f;
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("load task panicked: {e}"));
            }
        }
    }
    let elapsed = started.elapsed();
    let mut total_us: Vec<u32> = samples.iter().map(|s| s.total_us).collect();
    let mut ttfb_us: Vec<u32> = samples.iter().map(|s| s.ttfb_us).collect();
    total_us.sort_unstable();
    ttfb_us.sort_unstable();
    LoadResult {
        ok: samples.len(),
        errors,
        first_error,
        elapsed,
        total_us,
        ttfb_us,
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// One request: status must be 200; a stream must end with `data: [DONE]`. Time to first
/// byte is the first body chunk of a stream, the response head of a plain call.
async fn one(client: &reqwest::Client, target: &Target) -> Result<Sample, String> {
    let body = if target.stream {
        STREAM_BODY
    } else {
        NON_STREAM_BODY
    };
    let start = Instant::now();
    let mut resp = client
        .post(&target.url)
        .header(AUTHORIZATION, &target.authorization)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let head = start.elapsed();
    let status = resp.status();
    if status != StatusCode::OK {
        let text = resp.text().await.unwrap_or_default();
        let text: String = text.chars().take(300).collect();
        return Err(format!("status {status}: {text}"));
    }
    if target.stream {
        let mut first = None;
        let mut tail: Vec<u8> = Vec::with_capacity(TAIL * 2);
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("reading stream: {e}"))?
        {
            if first.is_none() {
                first = Some(start.elapsed());
            }
            tail.extend_from_slice(&chunk);
            if tail.len() > TAIL {
                tail.drain(..tail.len() - TAIL);
            }
        }
        let total = start.elapsed();
        if !tail.windows(DONE.len()).any(|w| w == DONE) {
            let end = String::from_utf8_lossy(&tail).into_owned();
            return Err(format!(
                "stream ended without `data: [DONE]`; it ended with {end:?}"
            ));
        }
        Ok(Sample {
            total_us: micros(total),
            ttfb_us: micros(first.unwrap_or(total)),
        })
    } else {
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| format!("reading body: {e}"))?;
        let total = start.elapsed();
        if bytes.is_empty() {
            return Err("empty body".to_owned());
        }
        Ok(Sample {
            total_us: micros(total),
            ttfb_us: micros(head),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        let p = percentiles(&v);
        assert_eq!(p.p50_ms, 50.0);
        assert_eq!(p.p99_ms, 99.0);
        assert_eq!(p.max_ms, 100.0);
        assert!(percentiles(&[]).p50_ms.is_nan());
    }

    #[test]
    fn bodies_are_json() {
        let a: serde_json::Value = serde_json::from_str(NON_STREAM_BODY).expect("json");
        let b: serde_json::Value = serde_json::from_str(STREAM_BODY).expect("json");
        assert!(a.get("stream").is_none());
        assert_eq!(b["stream"], true);
    }
}
