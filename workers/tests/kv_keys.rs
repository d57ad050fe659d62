//! `workers::kv_keys::list_keys` on real NATS: the listing every caller uses instead of
//! `kv::Store::keys` (which runs a consumer over the whole bucket and may not end while
//! heartbeats keep arriving).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream;
use schemas::Namespace;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use workers::kv_keys::{list_keys, ListKeysError, LIST_TIMEOUT};

const NATS_URL: &str = "nats://127.0.0.1:4222";

async fn bucket() -> (jetstream::Context, jetstream::kv::Store) {
    let ns = Namespace::new(&format!("t_{}", Uuid::now_v7().simple())).unwrap();
    let nats = async_nats::connect(NATS_URL).await.unwrap();
    let js = jetstream::new(nats);
    let kv = workers::node::bucket::open(&js, &ns).await.unwrap();
    (js, kv)
}

#[tokio::test]
async fn lists_the_keys_under_a_prefix_while_heartbeats_keep_arriving() {
    let (js, kv) = bucket().await;
    for i in 0..300 {
        kv.put(format!("node.{i:03}"), "{}".into()).await.unwrap();
    }
    kv.put("ban.a", "{}".into()).await.unwrap();
    kv.put("load.w1", "{}".into()).await.unwrap();

    // Writers that never stop, as live workers and nodes are.
    let stop = CancellationToken::new();
    let writer = {
        let kv = kv.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                kv.put("load.w1", n.to_string().into()).await.unwrap();
                kv.put(format!("node.{:03}", n % 300), "{}".into())
                    .await
                    .unwrap();
            }
        })
    };

    let nodes = list_keys(&kv, "node.", LIST_TIMEOUT).await.unwrap();
    let expected: Vec<String> = (0..300).map(|i| format!("node.{i:03}")).collect();
    assert_eq!(nodes, expected);
    assert_eq!(
        list_keys(&kv, "load.", LIST_TIMEOUT).await.unwrap(),
        vec!["load.w1".to_owned()]
    );
    let all = list_keys(&kv, "", LIST_TIMEOUT).await.unwrap();
    assert_eq!(all.len(), 302);
    assert_eq!(&all[..2], ["ban.a".to_owned(), "load.w1".to_owned()]);
    // A prefix that ends inside a token is filtered here, not by the server.
    assert_eq!(
        list_keys(&kv, "loa", LIST_TIMEOUT).await.unwrap(),
        vec!["load.w1".to_owned()]
    );
    assert!(list_keys(&kv, "none.", LIST_TIMEOUT)
        .await
        .unwrap()
        .is_empty());

    stop.cancel();
    writer.await.unwrap();
    js.delete_stream(&kv.stream_name).await.unwrap();
}

#[tokio::test]
async fn a_missing_bucket_or_an_exhausted_deadline_is_a_clear_error() {
    let (js, kv) = bucket().await;
    kv.put("node.1", "{}".into()).await.unwrap();

    match list_keys(&kv, "node.", Duration::ZERO).await {
        Err(ListKeysError::Timeout { bucket, after }) => {
            assert_eq!(bucket, kv.name);
            assert_eq!(after, Duration::ZERO);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }

    js.delete_stream(&kv.stream_name).await.unwrap();
    let err = list_keys(&kv, "node.", LIST_TIMEOUT).await.unwrap_err();
    assert!(matches!(err, ListKeysError::Nats { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&kv.name), "{message}");
}
