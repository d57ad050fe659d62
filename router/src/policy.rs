//! The selection policy: which channels a request tries, in which order.
//!
//! [`plan`] is the one entry point the workers call, so later rules (bans after repeated
//! failures, least load, health scores) change this file and nothing else.

use std::sync::Arc;

use rand::Rng;

use crate::channel::Channel;

/// One try of a request on one channel.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub channel: Arc<Channel>,
    /// The model name this channel is called with (after its `model_map`).
    pub upstream_model: String,
}

/// The ordered attempts for a request of `model` by a caller in `group`. Empty when no
/// channel can serve it (the worker answers 503 "no channel available").
///
/// Steps:
/// 1. Candidates are the enabled channels that list `model` and admit `group`.
/// 2. They are ordered by priority tier, lowest `priority` first, so a tier is only tried
///    once every channel of the tiers before it failed.
/// 3. Within a tier the order is a weighted random permutation: each channel draws an
///    exponential clock `-ln(u) / weight` and the earliest goes first. A channel is first
///    with probability `weight / sum(weights of the tier)`, the same for every later place
///    among the remaining channels, which spreads load by weight and still puts every
///    channel of the tier in the list for failover. A weight of 0 counts as 1 (the table
///    forbids it; a hand-built channel should not vanish from the plan).
/// 4. Each channel appears `retry` times in a row (at least once), so a flaky channel is
///    retried before the next one is tried.
pub fn plan(
    channels: &[Arc<Channel>],
    model: &str,
    group: &str,
    rng: &mut impl Rng,
) -> Vec<Attempt> {
    let mut ranked: Vec<(i32, f64, &Arc<Channel>)> = channels
        .iter()
        .filter(|c| c.enabled && c.serves(model, group))
        .map(|c| (c.priority, exponential_clock(rng, c.weight), c))
        .collect();
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));

    let total: usize = ranked.iter().map(|(_, _, c)| c.retry.max(1) as usize).sum();
    let mut attempts = Vec::with_capacity(total);
    for (_, _, channel) in ranked {
        let upstream_model = channel.upstream_model(model).to_owned();
        for _ in 0..channel.retry.max(1) {
            attempts.push(Attempt {
                channel: Arc::clone(channel),
                upstream_model: upstream_model.clone(),
            });
        }
    }
    attempts
}

/// The time an exponential clock of rate `weight` rings: the minimum of such clocks is the
/// one of rate `w` with probability `w / sum(w)` (Efraimidis–Spirakis sampling).
fn exponential_clock(rng: &mut impl Rng, weight: u32) -> f64 {
    // `random` is in [0, 1); 1 - u is in (0, 1], so the logarithm is finite.
    let u: f64 = 1.0 - rng.random::<f64>();
    -u.ln() / f64::from(weight.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::tests::channel;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn arc(c: Channel) -> Arc<Channel> {
        Arc::new(c)
    }

    fn names(attempts: &[Attempt]) -> Vec<&str> {
        attempts.iter().map(|a| a.channel.name.as_str()).collect()
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
        let set = [arc(a), arc(b), arc(c)];
        for _ in 0..50 {
            assert_eq!(names(&plan(&set, "m", "g", &mut rng)), ["b", "a", "c"]);
        }
    }

    #[test]
    fn weights_split_first_picks() {
        let mut rng = StdRng::seed_from_u64(42);
        let mut heavy = channel("heavy", &["m"]);
        heavy.weight = 3;
        let light = channel("light", &["m"]);
        let set = [arc(heavy), arc(light)];
        let runs = 2_000;
        let mut heavy_first = 0;
        for _ in 0..runs {
            let p = plan(&set, "m", "g", &mut rng);
            // Both channels are always in the plan, for failover.
            assert_eq!(p.len(), 2);
            if p[0].channel.name == "heavy" {
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
    fn groups_filter_channels() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut vip = channel("vip", &["m"]);
        vip.groups = vec!["vip".to_owned()];
        let open = channel("open", &["m"]);
        let set = [arc(vip), arc(open)];
        assert_eq!(names(&plan(&set, "m", "default", &mut rng)), ["open"]);
        let vip_plan = plan(&set, "m", "vip", &mut rng);
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
        let set = [arc(c)];
        assert_eq!(
            plan(&set, "gpt-4o-mini", "g", &mut rng)[0].upstream_model,
            "gpt-4o-mini-2024-07-18"
        );
        assert_eq!(
            plan(&set, "gpt-4o", "g", &mut rng)[0].upstream_model,
            "gpt-4o"
        );
        assert!(plan(&set, "gpt-5", "g", &mut rng).is_empty());
    }

    #[test]
    fn disabled_channels_are_skipped() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut off = channel("off", &["m"]);
        off.enabled = false;
        off.priority = -1;
        let on = channel("on", &["m"]);
        assert_eq!(
            names(&plan(&[arc(off.clone()), arc(on)], "m", "g", &mut rng)),
            ["on"]
        );
        assert!(plan(&[arc(off)], "m", "g", &mut rng).is_empty());
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
        let set = [arc(b), arc(a), arc(zero)];
        assert_eq!(
            names(&plan(&set, "m", "g", &mut rng)),
            ["a", "a", "a", "b", "b", "zero"]
        );
    }
}
