//! Cost of routing one request: `plan` over 100 channels, printed as ns per plan (the
//! first choice alone, and a whole plan of 6 attempts).
//!
//! `cargo bench -p router --bench pick`. Three shapes of the same 100 channels serving
//! one model: one tier of 100 (the worst case for the in-tier choice), ten tiers of ten,
//! and one tier where 30 channels are banned and some carry load.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use router::{plan, BreakerConfig, Channel, HealthBook, Policy, Route, Snapshot};
use schemas::work::ErrorKind;
use uuid::Uuid;

const CHANNELS: usize = 100;
const PLANS: u32 = 1_000_000;
const NOW: u64 = 1_700_000_000_000;

fn channels(tiers: usize) -> Vec<Arc<Channel>> {
    (0..CHANNELS)
        .map(|i| {
            Arc::new(Channel {
                id: Uuid::now_v7(),
                name: format!("channel-{i}"),
                channel_type: "openai".to_owned(),
                base_url: None,
                api_key: Some("sk-bench".to_owned()),
                models: vec![
                    "gpt-4o".to_owned(),
                    "gpt-4o-mini".to_owned(),
                    format!("own-{i}"),
                ],
                model_map: BTreeMap::from([(
                    "gpt-4o-mini".to_owned(),
                    "gpt-4o-mini-2024-07-18".to_owned(),
                )]),
                priority: i32::try_from(i % tiers).unwrap(),
                weight: u32::try_from(1 + i % 5).unwrap(),
                retry: 2,
                groups: Vec::new(),
                enabled: true,
            })
        })
        .collect()
}

fn measure(label: &str, snapshot: &Snapshot, max_attempts: u32) {
    let mut rng = SmallRng::seed_from_u64(1);
    let policy = Policy { max_attempts };
    let route = Route {
        model: "gpt-4o-mini",
        group: "default",
    };
    // Warm up caches and the allocator.
    for _ in 0..10_000 {
        black_box(plan(snapshot, route, &policy, NOW, &mut rng));
    }
    let started = Instant::now();
    for _ in 0..PLANS {
        let p = plan(black_box(snapshot), route, &policy, NOW, &mut rng);
        black_box(&p.attempts[0]);
    }
    let ns = started.elapsed().as_nanos() as f64 / f64::from(PLANS);
    println!("{label:<52} {ns:>8.0} ns/plan");
}

fn main() {
    println!("router::plan, {CHANNELS} channels serving the model, {PLANS} plans each");
    let book = HealthBook::default();
    let one_tier = Snapshot::build(channels(1), &book);
    measure(
        "one tier of 100, first choice only (1 attempt)",
        &one_tier,
        1,
    );
    measure("one tier of 100, whole plan (6 attempts)", &one_tier, 6);
    let book = HealthBook::default();
    measure(
        "ten tiers of ten, whole plan (6 attempts)",
        &Snapshot::build(channels(10), &book),
        6,
    );

    let book = HealthBook::default();
    let chans = channels(1);
    let cfg = BreakerConfig {
        failure_threshold: 1,
        ..BreakerConfig::default()
    };
    let mut guards = Vec::new();
    for (i, c) in chans.iter().enumerate() {
        let health = book.cell(c.id);
        if i % 10 < 3 {
            health.record_failure(ErrorKind::Upstream5xx, None, NOW, &cfg);
        } else if i % 2 == 0 {
            guards.push(health.start());
        }
    }
    measure(
        "one tier of 100, 30 banned, half loaded, whole plan",
        &Snapshot::build(chans, &book),
        6,
    );
    drop(guards);
}
