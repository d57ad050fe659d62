//! Listing the keys of a JetStream KV bucket: one bounded way for every caller (the
//! worker's start-up read of the channel bans, and the ingress' admin views of channel
//! health and nodes).
//!
//! `kv::Store::keys` is not used: it creates an ordered push consumer over the whole
//! bucket and yields until it has seen the last pending message, which can take long or
//! never end while workers and nodes keep putting heartbeats into the bucket, and it
//! leaves a consumer behind on the server for every call. Instead the keys are read from
//! the bucket stream's subject list (`STREAM.INFO` with `subjects_filter`, paged by
//! `Stream::info_with_subjects`): plain requests, no consumer, and the whole listing runs
//! under a deadline, so a slow or absent NATS gives a clear error instead of a hang.
//!
//! The subject list is the bucket's raw subjects: a key that was deleted or purged is
//! still listed while its delete marker is kept (our buckets keep one message per key).
//! Callers read each key anyway and skip the ones that read as absent.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::TryStreamExt;

/// The deadline callers use unless they have a reason to pick another: an admin page or
/// a worker's start-up should not wait longer than this for a listing.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ListKeysError {
    #[error("listing the keys of KV bucket `{bucket}` took longer than {after:?}; gave up")]
    Timeout { bucket: String, after: Duration },
    #[error("listing the keys of KV bucket `{bucket}` failed: {message}")]
    Nats { bucket: String, message: String },
}

/// The keys of `kv` that start with `prefix` (`""` for all), sorted and without
/// duplicates, read within `timeout`.
pub async fn list_keys(
    kv: &kv::Store,
    prefix: &str,
    timeout: Duration,
) -> Result<Vec<String>, ListKeysError> {
    let listing = async {
        let subjects = kv
            .stream
            .info_with_subjects(subjects_filter(&kv.prefix, prefix))
            .await?;
        subjects
            .try_fold(BTreeSet::new(), |mut keys, (subject, _count)| {
                if let Some(key) = key_of(&kv.prefix, prefix, &subject) {
                    keys.insert(key.to_owned());
                }
                async move { Ok(keys) }
            })
            .await
    };
    match tokio::time::timeout(timeout, listing).await {
        Ok(Ok(keys)) => Ok(keys.into_iter().collect()),
        Ok(Err(e)) => Err(ListKeysError::Nats {
            bucket: kv.name.clone(),
            message: e.to_string(),
        }),
        Err(_) => Err(ListKeysError::Timeout {
            bucket: kv.name.clone(),
            after: timeout,
        }),
    }
}

/// The subject filter for the keys under `prefix` of the bucket whose subjects start with
/// `bucket_prefix` (`$KV.<bucket>.`). A key prefix that ends inside a token (`"loa"`)
/// cannot be a subject filter; it asks for every subject and [`key_of`] filters.
fn subjects_filter(bucket_prefix: &str, prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('.') {
        format!("{bucket_prefix}{prefix}>")
    } else {
        format!("{bucket_prefix}>")
    }
}

/// The key of `subject` when it is in the bucket and starts with `prefix`.
fn key_of<'a>(bucket_prefix: &str, prefix: &str, subject: &'a str) -> Option<&'a str> {
    subject
        .strip_prefix(bucket_prefix)
        .filter(|key| !key.is_empty() && key.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_token_prefixes_filter_on_the_server() {
        assert_eq!(subjects_filter("$KV.B.", ""), "$KV.B.>");
        assert_eq!(subjects_filter("$KV.B.", "load."), "$KV.B.load.>");
        assert_eq!(subjects_filter("$KV.B.", "loa"), "$KV.B.>");
    }

    #[test]
    fn keys_are_the_subjects_past_the_bucket_prefix() {
        assert_eq!(key_of("$KV.B.", "", "$KV.B.ban.1"), Some("ban.1"));
        assert_eq!(key_of("$KV.B.", "ban.", "$KV.B.ban.1"), Some("ban.1"));
        assert_eq!(key_of("$KV.B.", "loa", "$KV.B.load.1"), Some("load.1"));
        assert_eq!(key_of("$KV.B.", "load.", "$KV.B.ban.1"), None);
        assert_eq!(key_of("$KV.B.", "", "$KV.OTHER.ban.1"), None);
    }
}
