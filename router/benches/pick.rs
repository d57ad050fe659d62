//! Cost of routing one request: `plan` over 100 channels, printed as ns per plan (the
//! first choice alone, and a whole plan of 6 attempts).
//!
//! `cargo bench -p router --bench pick`. Shapes of the same 100 channels serving one
//! model: one tier of 100 (the worst case for the in-tier choice), ten tiers of ten, one
//! tier where 30 channels are banned and some carry load, and one tier next to 20 personal
//! channels of 10 users (for a caller with 2 of them, and for one without).
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
                timeouts: Default::default(),
                owner: None,
            })
        })
        .collect()
}

fn measure(label: &str, snapshot: &Snapshot, max_attempts: u32) {
    measure_for(label, snapshot, max_attempts, None);
}

fn measure_for(label: &str, snapshot: &Snapshot, max_attempts: u32, user: Option<Uuid>) {
    let mut rng = SmallRng::seed_from_u64(1);
    let policy = Policy { max_attempts };
    let route = Route {
        model: "gpt-4o-mini",
        group: "default",
        user,
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

    // Personal channels: 10 users with 2 each besides the 100 shared ones; the caller is
    // one of them, so their 2 go first.
    let book = HealthBook::default();
    let mut chans = channels(1);
    let users: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    for (i, user) in users.iter().enumerate() {
        for j in 0..2 {
            let mut own = (*chans[0]).clone();
            own.id = Uuid::now_v7();
            own.name = format!("personal-{i}-{j}");
            own.owner = Some(*user);
            chans.push(Arc::new(own));
        }
    }
    let with_personal = Snapshot::build(chans, &book);
    measure_for(
        "one tier of 100 + caller's 2 personal, whole plan",
        &with_personal,
        6,
        Some(users[0]),
    );
    measure_for(
        "same, caller without personal channels",
        &with_personal,
        6,
        Some(Uuid::now_v7()),
    );
}
