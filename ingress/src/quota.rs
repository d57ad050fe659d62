//! Admission by money and rate: a request is queued only if its key may use the model,
//! every RPM/TPM limit of its key and user admits it, and the money it may draw on covers
//! its estimated cost.
//!
//! Whose money ([`Account`]): a key without a user spends its own allowance (quota +
//! credits, unlimited without a quota). A key with a user spends the user's wallet — the
//! balance shared by all their keys plus, for a model the user's plan pays for, the plan's
//! quota left this month (billing draws on the plan first) — and, when the key has a quota,
//! no more than that cap. A request must fit every account it draws on.
//!
//! The estimate is prompt tokens (tiktoken) plus `max_tokens` (or
//! [`DEFAULT_COMPLETION_TOKENS`]) at the model's price in force. It is *held* in Redis —
//! one hash per account, request id → amount, plus a sorted set of expiry times — by one
//! Lua script that admits only if `remaining − Σ holds ≥ estimate` on every account of the
//! request, so concurrent requests on every ingress and through every key of a user together
//! never promise more than the money: an account overspends at most by what a request uses
//! beyond its own estimate. One hash per user holds requests on plan-paid and other models
//! alike; a request on a model outside the plan is measured against the balance alone, so
//! holds of plan-paid requests make it conservative, never generous.
//!
//! A hold's life: reserved at admission (expires after the request timeout plus a margin,
//! so a crashed ingress frees it); at the terminal frame set to the real cost (or dropped
//! when the request failed before producing anything) with a short expiry; released when
//! the directory sees the request's ledger row, i.e. when the projected balance includes
//! it. The short expiry is only a safety net for a request the ledger never charges.
//!
//! Redis down (or slower than [`crate::limits::REDIS_WAIT`] to answer the hold): the projected balance
//! alone decides, without holds, so requests in flight are not counted against each other;
//! logged once per outage and counted per request in [`UNCHECKED`].
//!
//! Known bounds: with several ingresses, one may release a hold (its refresh saw the
//! ledger row) up to one refresh interval before another's snapshot includes that charge,
//! so for that interval the other undercounts by the charge. A request that uses more than
//! its estimate (no `max_tokens` and a longer answer than the default budget) overspends by
//! the difference. A restarted ingress does not release holds of charges it never saw;
//! they expire (conservative: the key is under-admitted until then). Requests refused for
//! quota still count against RPM/TPM.

use chrono::Utc;
use redis::aio::ConnectionManager;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use uuid::Uuid;

use schemas::work::{DoneData, Frame, FrameKind};
use schemas::{Namespace, Nanos, Price, Usage};

use crate::accounts::AccountError;
use crate::directory::Caller;
use crate::error::ApiError;
use crate::limits::{Checked, Limit, RateLimiter};
use crate::relay::FrameReader;
use crate::state::AppState;

/// Completion tokens assumed when a request sets no `max_tokens`.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 1024;
/// How long a settled hold may wait for the ledger before it expires on its own.
pub const SETTLED_HOLD: Duration = Duration::from_secs(120);
/// Added to the request timeout for a hold that was never settled.
const RESERVE_MARGIN: Duration = Duration::from_secs(60);
// A request waits at most `REDIS_WAIT` for Redis to place its hold before the projected
// balance alone decides (as for the rate limiter: a hung Redis must not hold requests). A
// hold Redis places after that is never settled and expires on its own: conservative.
/// Requests admitted against the projected balance alone because Redis did not answer.
pub const UNCHECKED: &str = "sluice_quota_holds_unavailable_total";

/// What the quota needs of a request, whatever its API.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub model: &'a str,
    pub max_tokens: Option<u64>,
    pub body: &'a Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Nanos,
}

pub fn estimate(price: Option<Price>, ask: Ask<'_>) -> Estimate {
    let prompt_tokens = billing::estimate_prompt(ask.model, ask.body);
    let completion_tokens = ask.max_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS);
    let usage = Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        ..Usage::default()
    };
    Estimate {
        prompt_tokens,
        completion_tokens,
        cost: price.map_or(Nanos::ZERO, |p| p.cost(&usage)),
    }
}

/// Whose money a hold is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Account {
    /// A key's own allowance (a key without a user) or cap (a key with a user).
    Key(Uuid),
    /// A user's wallet: balance and plan, shared by all their keys.
    User(Uuid),
}

/// The accounts a request of `caller` on `model` draws on, each with what is left on it as
/// projected (holds of requests in flight not yet subtracted). Empty = unlimited.
pub fn accounts(caller: &Caller, model: &str) -> Vec<(Account, i64)> {
    let mut accounts = Vec::with_capacity(2);
    if let Some(wallet) = &caller.wallet {
        accounts.push((Account::User(wallet.user_id), wallet.available(model)));
    }
    if let Some(remaining) = caller.remaining_nanos {
        accounts.push((Account::Key(caller.key_id), remaining));
    }
    accounts
}

/// Admits a request or refuses it with 404 (model not allowed for the key), 429
/// `rate_limit_exceeded` with `Retry-After`, or 429 `insufficient_quota`. The returned
/// [`Hold`] must be settled: pass the queued request's reader to [`Hold::attach`].
pub async fn admit(
    state: &AppState,
    caller: &Caller,
    request_id: Uuid,
    ask: Ask<'_>,
) -> Result<Hold, ApiError> {
    if !caller.may_use(ask.model) {
        return Err(ApiError::ModelNotFound(ask.model.to_owned()));
    }
    let accounts = accounts(caller, ask.model);
    let needs_tokens = !accounts.is_empty() || caller.tpm.is_some() || caller.user_tpm.is_some();
    if !needs_tokens && caller.rpm.is_none() && caller.user_rpm.is_none() {
        return Ok(Hold::none());
    }
    let price = state.directory.price(ask.model);
    let est = if needs_tokens {
        estimate(price, ask)
    } else {
        Estimate {
            prompt_tokens: 0,
            completion_tokens: 0,
            cost: Nanos::ZERO,
        }
    };
    let tokens = est.prompt_tokens + est.completion_tokens;
    let counters = check_limits(&state.limiter, caller, tokens).await?;
    let tpm_counters: Vec<String> = counters
        .into_iter()
        .filter(|(kind, _)| *kind == "tpm")
        .map(|(_, c)| c)
        .collect();
    let mut hold = Hold(Some(HoldInner {
        store: state.directory.holds().clone(),
        limiter: state.limiter.clone(),
        request_id,
        price,
        accounts: Vec::new(),
        tpm_counters,
        tpm_counted: tokens,
    }));
    if !accounts.is_empty() {
        let expire = state.opts.request_timeout + RESERVE_MARGIN;
        let store = state.directory.holds();
        match store.reserve(&accounts, request_id, est.cost, expire).await {
            Reservation::Held => {
                if let Some(inner) = hold.0.as_mut() {
                    inner.accounts = accounts.iter().map(|(a, _)| *a).collect();
                }
            }
            Reservation::Unavailable
                if accounts
                    .iter()
                    .all(|(_, left)| *left > 0 && *left >= est.cost.0) =>
            {
                metrics::counter!(UNCHECKED).increment(1);
            }
            Reservation::Refused | Reservation::Unavailable => {
                hold.release().await;
                return Err(ApiError::InsufficientQuota);
            }
        }
    }
    Ok(hold)
}

/// Key and user RPM/TPM in one atomic check; returns the counters as `(kind, key)`.
async fn check_limits(
    limiter: &RateLimiter,
    caller: &Caller,
    tokens: u64,
) -> Result<Vec<(&'static str, String)>, ApiError> {
    let key = format!("key:{}", caller.key_id.simple());
    let user = caller.user_id.map(|u| format!("user:{}", u.simple()));
    let mut limits: Vec<(&'static str, Limit)> = Vec::with_capacity(4);
    let mut push = |scope: &'static str, kind: &'static str, subject: &str, limit: u32, cost| {
        limits.push((
            scope,
            Limit {
                kind,
                subject: subject.to_owned(),
                limit,
                cost,
            },
        ));
    };
    if let Some(l) = caller.rpm {
        push("key", "rpm", &key, l, 1);
    }
    if let Some(l) = caller.tpm {
        push("key", "tpm", &key, l, tokens);
    }
    if let Some(user) = &user {
        if let Some(l) = caller.user_rpm {
            push("user", "rpm", user, l, 1);
        }
        if let Some(l) = caller.user_tpm {
            push("user", "tpm", user, l, tokens);
        }
    }
    if limits.is_empty() {
        return Ok(Vec::new());
    }
    let only: Vec<Limit> = limits.iter().map(|(_, l)| l.clone()).collect();
    match limiter.check_all(&only, now_ms()).await {
        Checked::Allowed { counters } => {
            Ok(limits.iter().map(|(_, l)| l.kind).zip(counters).collect())
        }
        Checked::Limited { index, retry_after } => {
            let (scope, l) = &limits[index];
            Err(AccountError::RateLimited {
                scope,
                unit: if l.kind == "rpm" {
                    "requests"
                } else {
                    "tokens"
                },
                limit: l.limit,
                window_secs: limiter.window_secs(),
                retry_after,
            }
            .into())
        }
    }
}

fn now_ms() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}

/// A request's claim on its key's balance and token counters, until it ends.
#[must_use = "a hold must be attached to the request's reader or released"]
pub struct Hold(Option<HoldInner>);

struct HoldInner {
    store: HoldStore,
    limiter: RateLimiter,
    request_id: Uuid,
    price: Option<Price>,
    /// The accounts holding the estimate (none when nothing was reserved).
    accounts: Vec<Account>,
    tpm_counters: Vec<String>,
    tpm_counted: u64,
}

impl Hold {
    /// Nothing held (no quota, no limits).
    pub fn none() -> Self {
        Hold(None)
    }

    /// Hands the hold to the queued request's reader, which settles it on the terminal
    /// frame; if queueing failed, releases it and passes the error on.
    pub async fn attach(
        self,
        queued: Result<FrameReader, ApiError>,
    ) -> Result<FrameReader, ApiError> {
        match queued {
            Ok(mut reader) => {
                reader.settle_on_end(self);
                Ok(reader)
            }
            Err(e) => {
                self.release().await;
                Err(e)
            }
        }
    }

    /// Settles against the terminal frame: the real cost and tokens for `Done`; for an
    /// `Error` as the very first frame nothing was produced, so the hold is dropped;
    /// a later error keeps the estimate until the ledger decides.
    pub async fn finish(mut self, frame: &Frame) {
        let Some(mut inner) = self.0.take() else {
            return;
        };
        match frame.kind {
            FrameKind::Done => {
                let Ok(done) = serde_json::from_str::<DoneData>(frame.data.get()) else {
                    inner.settle(None).await;
                    return;
                };
                let total = done
                    .usage
                    .total_tokens
                    .max(done.usage.prompt_tokens + done.usage.completion_tokens);
                let delta = i64::try_from(total).unwrap_or(i64::MAX)
                    - i64::try_from(inner.tpm_counted).unwrap_or(i64::MAX);
                let cost = inner.price.map_or(Nanos::ZERO, |p| p.cost(&done.usage));
                let limiter = inner.limiter.clone();
                let counters = std::mem::take(&mut inner.tpm_counters);
                // Both go out together on the multiplexed connection: one round trip.
                tokio::join!(limiter.adjust(&counters, delta), inner.settle(Some(cost)));
            }
            FrameKind::Error if frame.seq <= 1 => inner.settle(Some(Nanos::ZERO)).await,
            _ => inner.settle(None).await,
        }
    }

    /// Drops the hold at once (the request was never queued).
    pub async fn release(mut self) {
        if let Some(inner) = self.0.take() {
            let pairs: Vec<(Account, Uuid)> = inner
                .accounts
                .iter()
                .map(|a| (*a, inner.request_id))
                .collect();
            inner.store.release(&pairs).await;
        }
    }
}

impl HoldInner {
    /// `Some(cost)`: the hold becomes the real cost (0 drops it); `None`: the estimate
    /// stays. Either way it now waits for the ledger with a short expiry.
    async fn settle(self, cost: Option<Nanos>) {
        self.store
            .settle(&self.accounts, self.request_id, cost, SETTLED_HOLD)
            .await;
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(inner) = &self.0 {
            // A client gone mid-stream drops its reader: the hold then waits for the
            // ledger row (or its expiry), which is the right outcome, so this is routine.
            tracing::trace!(request_id = %inner.request_id, "quota hold left to the ledger");
        }
    }
}

enum Reservation {
    Held,
    Refused,
    Unavailable,
}

/// The Redis side of quota holds, shared by admission and the directory's refresh.
#[derive(Clone, Default)]
pub struct HoldStore {
    redis: Option<ConnectionManager>,
    ns: Namespace,
    warned: Arc<AtomicBool>,
}

impl std::fmt::Debug for HoldStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldStore")
            .field("redis", &self.redis.is_some())
            .field("ns", &self.ns)
            .finish()
    }
}

// The holds of an account: a hash of request id → nanos plus a running total in its field
// `_sum` (so admission is O(1), not a sum over every request in flight), and a sorted set
// of request ids scored by expiry (ms). Amounts stay integers (HINCRBY) below 2^53.

// KEYS: holds and expiries of each account, in pairs. ARGV: now ms, estimate, request id,
// expiry ms, idle TTL ms, then what is left on each account. Returns 1 and holds the
// estimate on every account if each covers it, else 0 and holds nothing.
static RESERVE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local est = tonumber(ARGV[2])
for i = 1, #KEYS / 2 do
  local holds, expiries = KEYS[2*i-1], KEYS[2*i]
  local expired = redis.call('ZRANGEBYSCORE', expiries, '-inf', ARGV[1])
  for _, id in ipairs(expired) do
    local v = redis.call('HGET', holds, id)
    if v then
      redis.call('HDEL', holds, id)
      redis.call('HINCRBY', holds, '_sum', -tonumber(v))
    end
  end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', expiries, '-inf', ARGV[1]) end
  local held = tonumber(redis.call('HGET', holds, '_sum') or '0')
  local left = tonumber(ARGV[5 + i]) - held
  if left <= 0 or left < est then return 0 end
end
for i = 1, #KEYS / 2 do
  local holds, expiries = KEYS[2*i-1], KEYS[2*i]
  redis.call('HSET', holds, ARGV[3], ARGV[2])
  redis.call('HINCRBY', holds, '_sum', ARGV[2])
  redis.call('ZADD', expiries, ARGV[4], ARGV[3])
  redis.call('PEXPIRE', holds, ARGV[5])
  redis.call('PEXPIRE', expiries, ARGV[5])
end
return 1
",
    )
});

// KEYS: holds and expiries of each account, in pairs. ARGV: request id, cost (or '' to
// keep the amount), expiry ms. Only touches holds that still exist: the ledger may already
// have released them.
static SETTLE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
for i = 1, #KEYS / 2 do
  local holds, expiries = KEYS[2*i-1], KEYS[2*i]
  local old = redis.call('HGET', holds, ARGV[1])
  if old then
    if ARGV[2] == '0' then
      redis.call('HDEL', holds, ARGV[1])
      redis.call('HINCRBY', holds, '_sum', -tonumber(old))
      redis.call('ZREM', expiries, ARGV[1])
    else
      if ARGV[2] ~= '' then
        redis.call('HSET', holds, ARGV[1], ARGV[2])
        redis.call('HINCRBY', holds, '_sum', tonumber(ARGV[2]) - tonumber(old))
      end
      redis.call('ZADD', expiries, ARGV[3], ARGV[1])
    end
  end
end
return 1
",
    )
});

// KEYS: holds and expiries of each pair; ARGV: the request id of each pair.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
for i = 1, #ARGV do
  local v = redis.call('HGET', KEYS[2*i-1], ARGV[i])
  if v then
    redis.call('HDEL', KEYS[2*i-1], ARGV[i])
    redis.call('HINCRBY', KEYS[2*i-1], '_sum', -tonumber(v))
  end
  redis.call('ZREM', KEYS[2*i], ARGV[i])
end
return 0
",
    )
});

impl HoldStore {
    pub fn new(redis: Option<ConnectionManager>, ns: Namespace) -> Self {
        Self {
            redis,
            ns,
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    fn keys(&self, account: Account) -> (String, String) {
        match account {
            Account::Key(key_id) => {
                let id = key_id.simple().to_string();
                (
                    self.ns.redis_key(&["quota", &id]),
                    self.ns.redis_key(&["quota", &id, "exp"]),
                )
            }
            Account::User(user_id) => {
                let id = user_id.simple().to_string();
                (
                    self.ns.redis_key(&["quota", "user", &id]),
                    self.ns.redis_key(&["quota", "user", &id, "exp"]),
                )
            }
        }
    }

    fn failed(&self, e: &redis::RedisError) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "Redis unreachable: quota is checked against projected balances only");
        }
    }

    /// Holds `estimate` on every account if each has that much left (`(account, left)`).
    async fn reserve(
        &self,
        accounts: &[(Account, i64)],
        request_id: Uuid,
        estimate: Nanos,
        expire: Duration,
    ) -> Reservation {
        let Some(redis) = &self.redis else {
            return Reservation::Unavailable;
        };
        let now = now_ms();
        let expire_ms = u64::try_from(expire.as_millis()).unwrap_or(u64::MAX);
        let mut invocation = RESERVE.prepare_invoke();
        for (account, _) in accounts {
            let (holds, expiries) = self.keys(*account);
            invocation.key(holds).key(expiries);
        }
        invocation
            .arg(now)
            .arg(estimate.0)
            .arg(request_id.simple().to_string())
            .arg(now.saturating_add(expire_ms))
            .arg(expire_ms.saturating_add(60_000));
        for (_, left) in accounts {
            invocation.arg(*left);
        }
        let result: Result<i64, redis::RedisError> =
            crate::limits::invoke_bounded(&invocation, redis).await;
        match result {
            Ok(1) => {
                self.warned.store(false, Ordering::Relaxed);
                Reservation::Held
            }
            Ok(_) => Reservation::Refused,
            Err(e) => {
                self.failed(&e);
                Reservation::Unavailable
            }
        }
    }

    async fn settle(
        &self,
        accounts: &[Account],
        request_id: Uuid,
        cost: Option<Nanos>,
        hold: Duration,
    ) {
        let Some(redis) = &self.redis else { return };
        if accounts.is_empty() {
            return;
        }
        let hold_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX);
        let mut invocation = SETTLE.prepare_invoke();
        for account in accounts {
            let (holds, expiries) = self.keys(*account);
            invocation.key(holds).key(expiries);
        }
        invocation
            .arg(request_id.simple().to_string())
            .arg(cost.map(|c| c.0.max(0).to_string()).unwrap_or_default())
            .arg(now_ms().saturating_add(hold_ms));
        let mut conn = redis.clone();
        let result: Result<i64, _> = invocation.invoke_async(&mut conn).await;
        if let Err(e) = result {
            self.failed(&e);
        }
    }

    /// Drops the holds of `(account, request_id)` pairs (charged by the ledger, or never
    /// queued).
    pub async fn release(&self, pairs: &[(Account, Uuid)]) {
        let Some(redis) = &self.redis else { return };
        if pairs.is_empty() {
            return;
        }
        // In batches, so one refresh after a backlog does not build one giant script call.
        for chunk in pairs.chunks(500) {
            let mut invocation = RELEASE.prepare_invoke();
            for (account, request_id) in chunk {
                let (holds, expiries) = self.keys(*account);
                invocation.key(holds).key(expiries);
                invocation.arg(request_id.simple().to_string());
            }
            let mut conn = redis.clone();
            if let Err(e) = invocation.invoke_async::<i64>(&mut conn).await {
                self.failed(&e);
                return;
            }
        }
    }

    /// The sum of an account's live holds (tests and diagnostics).
    pub async fn held(&self, account: Account) -> Option<i64> {
        let redis = self.redis.as_ref()?;
        let (holds, _) = self.keys(account);
        let mut conn = redis.clone();
        let sum: Option<i64> = redis::cmd("HGET")
            .arg(holds)
            .arg("_sum")
            .query_async(&mut conn)
            .await
            .ok()?;
        Some(sum.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn estimate_prices_prompt_plus_completion_budget() {
        let price = Price {
            input_per_mtok: Nanos(1_000_000_000), // $1 per million: 1000 nanos per token
            output_per_mtok: Nanos(2_000_000_000),
            cached_input_per_mtok: None,
            per_request: Nanos(7),
        };
        let body = json!({"messages": [{"role": "user", "content": "hello world"}]});
        let ask = Ask {
            model: "gpt-4o",
            max_tokens: Some(10),
            body: &body,
        };
        let e = estimate(Some(price), ask);
        assert_eq!(e.prompt_tokens, 3 + 1 + 2 + 3);
        assert_eq!(e.completion_tokens, 10);
        assert_eq!(e.cost, Nanos(9 * 1000 + 10 * 2000 + 7));
        let unpriced = estimate(
            None,
            Ask {
                max_tokens: None,
                ..ask
            },
        );
        assert_eq!(unpriced.completion_tokens, DEFAULT_COMPLETION_TOKENS);
        assert_eq!(unpriced.cost, Nanos::ZERO);
    }

    async fn store() -> HoldStore {
        let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis url");
        let conn = client.get_connection_manager().await.expect("redis");
        let ns = Namespace::new(&format!("t_{}", Uuid::now_v7().simple())).expect("ns");
        HoldStore::new(Some(conn), ns)
    }

    async fn cleanup(store: &HoldStore, account: Account) {
        let (holds, expiries) = store.keys(account);
        let mut conn = store.redis.clone().expect("redis");
        let _: () = redis::pipe()
            .del(holds)
            .del(expiries)
            .query_async(&mut conn)
            .await
            .expect("cleanup");
    }

    #[tokio::test]
    async fn holds_never_promise_more_than_the_balance() {
        let store = store().await;
        let key = Account::Key(Uuid::now_v7());
        let on = |left: i64| [(key, left)];
        let long = Duration::from_secs(60);
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let held = |r: Reservation| matches!(r, Reservation::Held);
        assert!(held(store.reserve(&on(100), a, Nanos(60), long).await));
        // 40 left: an estimate of 50 does not fit, 40 does.
        assert!(!held(store.reserve(&on(100), b, Nanos(50), long).await));
        assert!(held(store.reserve(&on(100), b, Nanos(40), long).await));
        assert_eq!(store.held(key).await, Some(100));
        // Nothing left, even for a free request.
        assert!(!held(store.reserve(&on(100), c, Nanos(0), long).await));
        // Settling to the real cost frees the difference; a failed request frees it all.
        store.settle(&[key], a, Some(Nanos(25)), long).await;
        store.settle(&[key], b, Some(Nanos(0)), long).await;
        assert_eq!(store.held(key).await, Some(25));
        // The ledger charged `a`: its hold goes; settling it again later changes nothing.
        store.release(&[(key, a)]).await;
        store.settle(&[key], a, Some(Nanos(25)), long).await;
        assert_eq!(store.held(key).await, Some(0));
        // An expired hold no longer counts.
        let short = Duration::from_millis(1);
        assert!(held(store.reserve(&on(100), c, Nanos(100), short).await));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(held(store.reserve(&on(100), a, Nanos(100), long).await));
        cleanup(&store, key).await;
    }

    #[tokio::test]
    async fn concurrent_reservations_fit_the_balance() {
        let store = store().await;
        let key = Account::Key(Uuid::now_v7());
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let hold = Duration::from_secs(60);
                    let on = [(key, 1_000)];
                    let r = store.reserve(&on, Uuid::now_v7(), Nanos(70), hold);
                    matches!(r.await, Reservation::Held)
                })
            })
            .collect();
        let mut held = 0;
        for t in tasks {
            held += usize::from(t.await.expect("task"));
        }
        assert_eq!(held, 14); // 14 × 70 = 980 ≤ 1000 < 15 × 70
        assert_eq!(store.held(key).await, Some(980));
        cleanup(&store, key).await;
    }

    #[tokio::test]
    async fn a_request_must_fit_every_account_it_draws_on() {
        let store = store().await;
        let user = Account::User(Uuid::now_v7());
        let (capped, other) = (Account::Key(Uuid::now_v7()), Account::Key(Uuid::now_v7()));
        let long = Duration::from_secs(60);
        let held = |r: Reservation| matches!(r, Reservation::Held);
        let (a, b, c, d) = (
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        // The user has 100; one key is capped at 50, the other is not.
        assert!(held(
            store
                .reserve(&[(user, 100), (capped, 50)], a, Nanos(40), long)
                .await
        ));
        // The cap refuses, and the user's balance is not held either.
        assert!(!held(
            store
                .reserve(&[(user, 100), (capped, 50)], b, Nanos(20), long)
                .await
        ));
        assert_eq!(store.held(user).await, Some(40));
        // The other key shares the user's balance: 60 left there.
        assert!(!held(
            store.reserve(&[(user, 100)], c, Nanos(70), long).await
        ));
        assert!(held(
            store.reserve(&[(user, 100)], c, Nanos(60), long).await
        ));
        assert!(!held(
            store.reserve(&[(user, 100)], d, Nanos(1), long).await
        ));
        // Settling and releasing move every account of the request.
        store
            .settle(&[user, capped], a, Some(Nanos(10)), long)
            .await;
        assert_eq!(
            (store.held(user).await, store.held(capped).await),
            (Some(70), Some(10))
        );
        store.release(&[(user, a), (capped, a), (user, c)]).await;
        assert_eq!(
            (store.held(user).await, store.held(capped).await),
            (Some(0), Some(0))
        );
        assert_eq!(store.held(other).await, Some(0));
        for account in [user, capped, other] {
            cleanup(&store, account).await;
        }
    }

    #[test]
    fn a_users_key_draws_on_the_wallet_and_its_cap() {
        use crate::directory::{PlanGrant, Wallet};
        let (key_id, user_id) = (Uuid::now_v7(), Uuid::now_v7());
        let wallet = Wallet {
            user_id,
            balance_nanos: 300,
            plan: Some(PlanGrant {
                plan_id: Uuid::now_v7(),
                models: vec!["in-plan".into()],
                left_nanos: 1_000,
            }),
        };
        let mut caller = Caller {
            key_id,
            user_id: Some(user_id),
            group: "default".into(),
            rpm: None,
            tpm: None,
            user_rpm: None,
            user_tpm: None,
            allowed_models: vec![],
            remaining_nanos: None,
            wallet: Some(std::sync::Arc::new(wallet.clone())),
        };
        // The plan adds to the balance only for its models.
        assert_eq!(
            accounts(&caller, "in-plan"),
            [(Account::User(user_id), 1_300)]
        );
        assert_eq!(accounts(&caller, "other"), [(Account::User(user_id), 300)]);
        caller.remaining_nanos = Some(50);
        assert_eq!(
            accounts(&caller, "other"),
            [(Account::User(user_id), 300), (Account::Key(key_id), 50)]
        );
        // An overrun balance does not eat into the plan; a used-up plan adds nothing.
        let overrun = Wallet {
            balance_nanos: -20,
            ..wallet.clone()
        };
        assert_eq!(overrun.available("in-plan"), 1_000);
        assert_eq!(overrun.available("other"), 0);
        // A key without a user: its own allowance, or nothing to check at all.
        caller.wallet = None;
        caller.user_id = None;
        assert_eq!(accounts(&caller, "other"), [(Account::Key(key_id), 50)]);
        caller.remaining_nanos = None;
        assert!(accounts(&caller, "other").is_empty());
    }

    #[tokio::test]
    async fn limits_count_all_or_nothing() {
        let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis url");
        let conn = client.get_connection_manager().await.expect("redis");
        let ns = Namespace::new(&format!("t_{}", Uuid::now_v7().simple())).expect("ns");
        let limiter = RateLimiter::with_window(Some(conn), ns, 60);
        let rpm = |limit| Limit {
            kind: "rpm",
            subject: "key:k".into(),
            limit,
            cost: 1,
        };
        let tpm = |limit, cost| Limit {
            kind: "tpm",
            subject: "user:u".into(),
            limit,
            cost,
        };
        let allowed = |c: Checked| matches!(c, Checked::Allowed { .. });
        // The start of a window, far in the past so no real counter collides.
        let now = 120_000;
        assert!(allowed(
            limiter.check_all(&[rpm(2), tpm(100, 60)], now).await
        ));
        // The token limit refuses, so the request limit is not used up either.
        assert_eq!(
            limiter.check_all(&[rpm(2), tpm(100, 60)], now).await,
            Checked::Limited {
                index: 1,
                retry_after: 60
            }
        );
        assert!(allowed(
            limiter.check_all(&[rpm(2), tpm(100, 40)], now).await
        ));
        assert_eq!(
            limiter.check_all(&[rpm(2)], now + 1_000).await,
            Checked::Limited {
                index: 0,
                retry_after: 59
            }
        );
        // Half way through the next window, half of the previous one still counts: 1 + 1 ≤ 2.
        assert!(allowed(limiter.check_all(&[rpm(2)], now + 90_000).await));
        assert!(!allowed(limiter.check_all(&[rpm(2)], now + 90_000).await));
    }
}
