//! The selection policy: which channels a request tries, in which order.
//!
//! [`plan`] is the one entry point the workers call. It reads health (bans, in-flight
//! counts) but never changes it; recording outcomes is the caller's job through
//! [`crate::Health`].

use std::sync::Arc;

use rand::Rng;
use uuid::Uuid;

use crate::channel::Channel;
use crate::health::{Availability, Health};
use crate::set::Snapshot;

/// What is being routed.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    /// The model name the client asked for.
    pub model: &'a str,
    /// The caller's key group.
    pub group: &'a str,
    /// The user the caller's key belongs to: their personal channels are tried first.
    pub user: Option<Uuid>,
}

/// Limits of one request's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Attempts in total, over all channels and retries. With a deadline (enforced by the
    /// worker) this bounds what one request can cost the upstreams when everything fails.
    pub max_attempts: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self { max_attempts: 6 }
    }
}

/// One try of a request on one channel.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub channel: Arc<Channel>,
    /// Where the outcome is recorded (bans, in-flight count).
    pub health: Arc<Health>,
    /// The model name this channel is called with (after its `model_map`).
    pub upstream_model: String,
    /// The channel's ban ran out and this attempt would be its half-open probe: the
    /// worker must claim the probe before calling, and skip the attempt if it cannot.
    pub probe: bool,
}

/// The ordered attempts of a request.
#[derive(Debug, Default)]
pub struct Plan {
    pub attempts: Vec<Attempt>,
    /// Earliest end of a ban among candidates left out because they are banned (Unix
    /// ms). When `attempts` is empty and this is set, the model has channels, they are
    /// just all banned for now: the caller can say when to come back.
    pub banned_until_ms: Option<u64>,
}

/// A candidate within one tier.
#[derive(Clone, Copy)]
struct Candidate {
    index: usize,
    weight: u64,
    load: u64,
    probe: bool,
}

/// The ordered attempts for `route`, at most `policy.max_attempts` long.
///
/// Steps:
/// 1. Candidates are the enabled channels that list the model (the snapshot's index) and
///    admit the caller's group, minus banned ones and half-open ones whose probe another
///    request holds.
/// 2. The caller's personal channels (bring your own key) come first, in their own
///    priority tiers, then the shared channels' tiers; tiers go lowest `priority` first,
///    so a tier is only tried once every channel of the tiers before it failed. Other
///    users' personal channels are never candidates.
/// 3. Within a tier, power of two choices: two distinct channels are drawn with
///    probability proportional to weight, and the one with fewer calls in flight per unit
///    of weight goes next (a tie keeps the first draw). Idle channels therefore split
///    first picks by weight exactly, and a channel that is slow or saturated (calls pile
///    up) is passed over in proportion. A weight of 0 counts as 1 (the table forbids it;
///    a hand-built channel should not vanish).
/// 4. Each channel appears `retry` times in a row (at least once), so a flaky channel is
///    retried before the next is tried; a probe appears once.
pub fn plan(
    snapshot: &Snapshot,
    route: Route<'_>,
    policy: &Policy,
    now_ms: u64,
    rng: &mut impl Rng,
) -> Plan {
    let budget = policy.max_attempts.max(1) as usize;
    let mut out = Plan {
        attempts: Vec::with_capacity(budget),
        banned_until_ms: None,
    };
    let personal = route
        .user
        .map_or(&[][..], |user| snapshot.personal_tiers(user, route.model));
    let tiers = personal.iter().chain(snapshot.tiers(route.model));
    let widest = tiers.clone().map(|t| t.members.len()).max().unwrap_or(0);
    let mut candidates: Vec<Candidate> = Vec::with_capacity(widest);
    for tier in tiers {
        if out.attempts.len() >= budget {
            break;
        }
        candidates.clear();
        for member in &tier.members {
            if !member.open && !snapshot.channel(member.index).admits(route.group) {
                continue;
            }
            let health = &member.health;
            let probe = match health.availability(now_ms) {
                Availability::Closed => false,
                Availability::HalfOpen { probe_free: true } => true,
                Availability::HalfOpen { probe_free: false } => {
                    let until = health.probe_until_ms();
                    out.banned_until_ms = Some(out.banned_until_ms.map_or(until, |u| u.min(until)));
                    continue;
                }
                Availability::Banned(until) => {
                    out.banned_until_ms = Some(out.banned_until_ms.map_or(until, |u| u.min(until)));
                    continue;
                }
            };
            candidates.push(Candidate {
                index: member.index,
                weight: member.weight,
                load: u64::from(health.load()),
                probe,
            });
        }
        let mut total: u64 = candidates.iter().map(|c| c.weight).sum();
        while !candidates.is_empty() && out.attempts.len() < budget {
            let picked = pick(&mut candidates, total, rng);
            total -= picked.weight;
            let channel = snapshot.channel(picked.index);
            let repeats = if picked.probe {
                1
            } else {
                channel.retry.max(1) as usize
            };
            let upstream_model = channel.upstream_model(route.model);
            for _ in 0..repeats.min(budget - out.attempts.len()) {
                out.attempts.push(Attempt {
                    channel: Arc::clone(channel),
                    health: Arc::clone(snapshot.health(picked.index)),
                    upstream_model: upstream_model.to_owned(),
                    probe: picked.probe,
                });
            }
        }
    }
    out
}

/// Removes and returns the next channel of a tier (step 3 of [`plan`]). `total` is the
/// sum of the candidates' weights.
fn pick(candidates: &mut Vec<Candidate>, total: u64, rng: &mut impl Rng) -> Candidate {
    if candidates.len() == 1 {
        return candidates.swap_remove(0);
    }
    let first = draw(candidates, total, None, rng);
    let second = draw(
        candidates,
        total - candidates[first].weight,
        Some(first),
        rng,
    );
    let (a, b) = (candidates[first], candidates[second]);
    // b.load / b.weight < a.load / a.weight, without division.
    let chosen =
        if u128::from(b.load) * u128::from(a.weight) < u128::from(a.load) * u128::from(b.weight) {
            second
        } else {
            first
        };
    candidates.swap_remove(chosen)
}

/// A candidate drawn with probability weight / `total`, never `skip`.
fn draw(candidates: &[Candidate], total: u64, skip: Option<usize>, rng: &mut impl Rng) -> usize {
    let mut ticket = rng.random_range(0..total.max(1));
    let mut last = 0;
    for (i, c) in candidates.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        if ticket < c.weight {
            return i;
        }
        ticket -= c.weight;
        last = i;
    }
    // Only reached if `total` overstated the weights; the last eligible one is as good.
    last
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::channel::tests::channel;
    use crate::health::{BreakerConfig, HealthBook};
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use schemas::work::ErrorKind;

    const NOW: u64 = 1_700_000_000_000;

    fn snap(channels: Vec<Channel>) -> Snapshot {
        Snapshot::build(
            channels.into_iter().map(Arc::new).collect(),
            &HealthBook::default(),
        )
    }

    fn route<'a>(model: &'a str, group: &'a str) -> Route<'a> {
        Route {
            model,
            group,
            user: None,
        }
    }

    fn names(p: &Plan) -> Vec<&str> {
        p.attempts.iter().map(|a| a.channel.name.as_str()).collect()
    }

    fn go(s: &Snapshot, model: &str, group: &str, rng: &mut StdRng) -> Plan {
        plan(s, route(model, group), &Policy::default(), NOW, rng)
    }

    fn ban(s: &Snapshot, name: &str, now: u64) {
        let i = s.channels().iter().position(|c| c.name == name).unwrap();
        let cfg = BreakerConfig {
            failure_threshold: 1,
            ..BreakerConfig::default()
        };
        s.health(i)
            .record_failure(ErrorKind::Upstream5xx, None, now, &cfg)
            .unwrap();
    }

    #[test]
    fn tiers_go_lowest_priority_first() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut a = channel("a", &["m"]);
        a.priority = 2;
        let mut b = channel("b", &["m"]);
        b.priority = 1;
        let mut c = channel("c", &["m"]);
        c.priority = 3;
        let s = snap(vec![a, b, c]);
        for _ in 0..50 {
            assert_eq!(names(&go(&s, "m", "g", &mut rng)), ["b", "a", "c"]);
        }
    }

    #[test]
    fn weights_split_first_picks_three_to_one() {
        let mut rng = StdRng::seed_from_u64(42);
        let mut heavy = channel("heavy", &["m"]);
        heavy.weight = 3;
        let light = channel("light", &["m"]);
        let s = snap(vec![heavy, light]);
        let runs = 2_000;
        let mut heavy_first = 0;
        for _ in 0..runs {
            let p = go(&s, "m", "g", &mut rng);
            // Both channels are always in the plan, for failover.
            assert_eq!(p.attempts.len(), 2);
            if p.attempts[0].channel.name == "heavy" {
                heavy_first += 1;
            }
        }
        let share = f64::from(heavy_first) / f64::from(runs);
        assert!(
            (0.70..=0.80).contains(&share),
            "heavy went first in {share:.3} of plans"
        );
    }

    #[test]
    fn weights_split_among_many_channels() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut chans = Vec::new();
        for (name, w) in [("w1", 1), ("w2", 2), ("w3", 3), ("w4", 4)] {
            let mut c = channel(name, &["m"]);
            c.weight = w;
            chans.push(c);
        }
        let s = snap(chans);
        let mut firsts = std::collections::HashMap::new();
        let runs = 20_000;
        for _ in 0..runs {
            *firsts
                .entry(go(&s, "m", "g", &mut rng).attempts[0].channel.name.clone())
                .or_insert(0u32) += 1;
        }
        for (name, w) in [("w1", 1.0), ("w2", 2.0), ("w3", 3.0), ("w4", 4.0)] {
            let share = f64::from(firsts[name]) / f64::from(runs);
            assert!((share - w / 10.0).abs() < 0.02, "{name}: {share:.3}");
        }
    }

    #[test]
    fn the_less_loaded_channel_goes_first() {
        let mut rng = StdRng::seed_from_u64(5);
        let s = snap(vec![channel("busy", &["m"]), channel("idle", &["m"])]);
        let busy = Arc::clone(s.health(0));
        let _calls: Vec<_> = (0..4).map(|_| busy.start()).collect();
        for _ in 0..200 {
            assert_eq!(names(&go(&s, "m", "g", &mut rng)), ["idle", "busy"]);
        }
        // Load is per unit of weight: 4 calls on weight 8 beat 1 call on weight 1.
        let mut big = channel("big", &["m"]);
        big.weight = 8;
        let s = snap(vec![big, channel("small", &["m"])]);
        let _big_calls: Vec<_> = (0..4).map(|_| s.health(0).start()).collect();
        let _small_call = s.health(1).start();
        for _ in 0..200 {
            assert_eq!(go(&s, "m", "g", &mut rng).attempts[0].channel.name, "big");
        }
        // Other workers' calls count too.
        s.health(0).set_remote_in_flight(100);
        assert_eq!(go(&s, "m", "g", &mut rng).attempts[0].channel.name, "small");
    }

    #[test]
    fn groups_filter_channels() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut vip = channel("vip", &["m"]);
        vip.groups = vec!["vip".to_owned()];
        let s = snap(vec![vip, channel("open", &["m"])]);
        assert_eq!(names(&go(&s, "m", "default", &mut rng)), ["open"]);
        let vip_plan = go(&s, "m", "vip", &mut rng);
        let mut both = names(&vip_plan);
        both.sort_unstable();
        assert_eq!(both, ["open", "vip"]);
    }

    #[test]
    fn model_map_sets_the_upstream_model() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut c = channel("a", &["gpt-4o-mini", "gpt-4o"]);
        c.model_map.insert(
            "gpt-4o-mini".to_owned(),
            "gpt-4o-mini-2024-07-18".to_owned(),
        );
        let s = snap(vec![c]);
        assert_eq!(
            go(&s, "gpt-4o-mini", "g", &mut rng).attempts[0].upstream_model,
            "gpt-4o-mini-2024-07-18"
        );
        assert_eq!(
            go(&s, "gpt-4o", "g", &mut rng).attempts[0].upstream_model,
            "gpt-4o"
        );
        let none = go(&s, "gpt-5", "g", &mut rng);
        assert!(none.attempts.is_empty());
        assert_eq!(none.banned_until_ms, None);
    }

    #[test]
    fn disabled_channels_are_skipped() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut off = channel("off", &["m"]);
        off.enabled = false;
        off.priority = -1;
        let s = snap(vec![off.clone(), channel("on", &["m"])]);
        assert_eq!(names(&go(&s, "m", "g", &mut rng)), ["on"]);
        assert!(go(&snap(vec![off]), "m", "g", &mut rng).attempts.is_empty());
    }

    #[test]
    fn retry_repeats_a_channel_in_a_row() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut a = channel("a", &["m"]);
        a.retry = 3;
        let mut b = channel("b", &["m"]);
        b.priority = 1;
        b.retry = 2;
        let mut zero = channel("zero", &["m"]);
        zero.priority = 2;
        zero.retry = 0;
        let s = snap(vec![b, a, zero]);
        assert_eq!(
            names(&go(&s, "m", "g", &mut rng)),
            ["a", "a", "a", "b", "b", "zero"]
        );
    }

    #[test]
    fn the_attempt_budget_caps_the_plan() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut chans = Vec::new();
        for i in 0..10 {
            let mut c = channel(&format!("c{i}"), &["m"]);
            c.priority = i;
            c.retry = 3;
            chans.push(c);
        }
        let s = snap(chans);
        let p = plan(
            &s,
            route("m", "g"),
            &Policy { max_attempts: 4 },
            NOW,
            &mut rng,
        );
        assert_eq!(names(&p), ["c0", "c0", "c0", "c1"]);
        let p = plan(
            &s,
            route("m", "g"),
            &Policy { max_attempts: 0 },
            NOW,
            &mut rng,
        );
        assert_eq!(names(&p), ["c0"], "a budget of 0 still allows one attempt");
    }

    #[test]
    fn a_banned_channel_gets_no_traffic_until_its_probe() {
        let mut rng = StdRng::seed_from_u64(9);
        let mut primary = channel("primary", &["m"]);
        primary.retry = 2;
        let mut backup = channel("backup", &["m"]);
        backup.priority = 1;
        let s = snap(vec![primary, backup]);
        ban(&s, "primary", NOW);
        let until = NOW + 60_000;
        for t in [NOW, NOW + 1, until - 1] {
            let p = plan(&s, route("m", "g"), &Policy::default(), t, &mut rng);
            assert_eq!(names(&p), ["backup"]);
            assert_eq!(p.banned_until_ms, Some(until));
        }
        // The ban ran out: the primary is probed, once, before the backup.
        let p = plan(&s, route("m", "g"), &Policy::default(), until, &mut rng);
        assert_eq!(names(&p), ["primary", "backup"]);
        assert!(p.attempts[0].probe);
        let cfg = BreakerConfig::default();
        assert!(p.attempts[0].health.try_claim_probe(until, &cfg));
        // While the probe runs, other requests go to the backup.
        let p = plan(&s, route("m", "g"), &Policy::default(), until + 1, &mut rng);
        assert_eq!(names(&p), ["backup"]);
        // The probe answered: the primary is back with its retries.
        assert!(s.health(0).record_success(until + 1));
        let p = plan(&s, route("m", "g"), &Policy::default(), until + 2, &mut rng);
        assert_eq!(names(&p), ["primary", "primary", "backup"]);
        assert!(!p.attempts[0].probe);
    }

    #[test]
    fn personal_channels_go_first_for_their_owner_only() {
        let mut rng = StdRng::seed_from_u64(11);
        let alice = Uuid::now_v7();
        let bob = Uuid::now_v7();
        let mut shared = channel("shared", &["m"]);
        shared.priority = -5;
        let mut mine = channel("alice-own", &["m", "alice-only"]);
        mine.owner = Some(alice);
        mine.priority = 10;
        mine.retry = 2;
        let mut mine_later = channel("alice-backup", &["m"]);
        mine_later.owner = Some(alice);
        mine_later.priority = 20;
        let mut theirs = channel("bob-own", &["m"]);
        theirs.owner = Some(bob);
        let s = snap(vec![shared, mine, mine_later, theirs]);
        let as_user = |user, model, rng: &mut StdRng| {
            let r = Route {
                model,
                group: "g",
                user,
            };
            plan(&s, r, &Policy::default(), NOW, rng)
        };
        // The owner's channels, in their own priority order, ahead of every shared tier
        // (whatever its priority).
        assert_eq!(
            names(&as_user(Some(alice), "m", &mut rng)),
            ["alice-own", "alice-own", "alice-backup", "shared"]
        );
        assert_eq!(
            names(&as_user(Some(bob), "m", &mut rng)),
            ["bob-own", "shared"]
        );
        // Nobody else ever gets them: not another user, not a key without a user.
        assert_eq!(
            names(&as_user(Some(Uuid::now_v7()), "m", &mut rng)),
            ["shared"]
        );
        assert_eq!(names(&as_user(None, "m", &mut rng)), ["shared"]);
        assert_eq!(
            names(&as_user(Some(alice), "alice-only", &mut rng)),
            ["alice-own", "alice-own"]
        );
        let other = as_user(Some(bob), "alice-only", &mut rng);
        assert!(other.attempts.is_empty());
        assert_eq!(other.banned_until_ms, None);
    }

    #[test]
    fn a_banned_or_disabled_personal_channel_falls_back_to_shared_ones() {
        let mut rng = StdRng::seed_from_u64(12);
        let alice = Uuid::now_v7();
        let mut mine = channel("mine", &["m"]);
        mine.owner = Some(alice);
        let mut vip_only = channel("mine-vip", &["m"]);
        vip_only.owner = Some(alice);
        vip_only.groups = vec!["vip".to_owned()];
        let s = snap(vec![mine.clone(), vip_only, channel("shared", &["m"])]);
        let r = Route {
            model: "m",
            group: "default",
            user: Some(alice),
        };
        // Groups filter personal channels like shared ones.
        assert_eq!(
            names(&plan(&s, r, &Policy::default(), NOW, &mut rng)),
            ["mine", "shared"]
        );
        ban(&s, "mine", NOW);
        let p = plan(&s, r, &Policy::default(), NOW + 1, &mut rng);
        assert_eq!(names(&p), ["shared"]);
        assert_eq!(p.banned_until_ms, Some(NOW + 60_000));
        mine.enabled = false;
        let s = snap(vec![mine, channel("shared", &["m"])]);
        assert_eq!(
            names(&plan(&s, r, &Policy::default(), NOW, &mut rng)),
            ["shared"]
        );
    }

    #[test]
    fn when_every_channel_is_banned_the_plan_says_until_when() {
        let mut rng = StdRng::seed_from_u64(9);
        let s = snap(vec![channel("a", &["m"]), channel("b", &["m"])]);
        ban(&s, "a", NOW);
        ban(&s, "b", NOW + 5_000);
        let p = go(&s, "m", "g", &mut rng);
        assert!(p.attempts.is_empty());
        assert_eq!(p.banned_until_ms, Some(NOW + 60_000));
    }
}
