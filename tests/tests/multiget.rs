//! `mtx_runtime::multiget::last_messages` against a real nats-server: the
//! batched direct get returns exactly what one direct get per subject
//! returns (latest value, revision, delete markers), across request chunks.

mod common;

use async_nats::jetstream::kv;
use common::*;
use mtx_harness::{unique, NatsServer};
use mtx_runtime::multiget::{is_kv_marker, last_messages, MultiGetError, MAX_SUBJECTS};
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_matches_one_direct_get_per_key() {
    let nats = NatsServer::start();
    let js = js(&nats).await;
    let bucket = unique("mg");
    let store = js
        .create_key_value(kv::Config {
            bucket: bucket.clone(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let stream = store.stream_name.clone();
    let subject = |k: &str| format!("{}{k}", store.prefix);

    // More keys than one request carries, so the answer spans chunks.
    let n = MAX_SUBJECTS + 150;
    for i in 0..n {
        store
            .put(format!("k{i}"), format!("v{i}").into())
            .await
            .unwrap();
    }
    // An updated key answers its latest value; a deleted one its marker.
    let rev_k1 = store.put("k1", "v1b".into()).await.unwrap();
    store.delete("k2").await.unwrap();

    let mut subjects: Vec<String> = (0..n).map(|i| subject(&format!("k{i}"))).collect();
    subjects.push(subject("missing"));
    let got = last_messages(&js.client(), &stream, &subjects, T)
        .await
        .unwrap();
    assert_eq!(got.len(), n, "every stored key, and not the missing one");
    assert!(!got.contains_key(&subject("missing")));

    for i in (0..n).step_by(97).chain([0, 1, 2, n - 1]) {
        let key = format!("k{i}");
        let m = &got[&subject(&key)];
        let one = store.entry(&key).await.unwrap();
        let op = m
            .headers
            .get("KV-Operation")
            .map(|v| v.as_str().to_string());
        assert_eq!(is_kv_marker(m), op.is_some(), "{key}");
        match one {
            Some(e) if e.operation == kv::Operation::Put => {
                assert_eq!(m.payload, e.value, "{key}");
                assert_eq!(m.sequence, e.revision, "{key}");
                assert_eq!(op, None, "{key}");
            }
            Some(e) => {
                assert_eq!(m.sequence, e.revision, "{key}");
                assert_eq!(op.as_deref(), Some("DEL"), "{key}");
            }
            None => panic!("{key} has no entry, the batch returned {m:?}"),
        }
    }
    assert_eq!(&got[&subject("k1")].payload[..], b"v1b");
    assert_eq!(got[&subject("k1")].sequence, rev_k1);
    assert_eq!(
        got[&subject("k2")]
            .headers
            .get("KV-Operation")
            .map(|v| v.as_str()),
        Some("DEL")
    );

    // Nothing found at all is an empty answer, not an error.
    let none = last_messages(
        &js.client(),
        &stream,
        &[subject("nope1"), subject("nope2")],
        T,
    )
    .await
    .unwrap();
    assert!(none.is_empty());
    // No subjects: no request.
    assert!(last_messages(&js.client(), &stream, &[], T)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_does_not_exist_is_an_error() {
    let nats = NatsServer::start();
    let js = js(&nats).await;
    let r = last_messages(
        &js.client(),
        &unique("NO_SUCH_STREAM"),
        &["a.b".to_string()],
        Duration::from_secs(2),
    )
    .await;
    assert!(
        matches!(
            r,
            Err(MultiGetError::Timeout { .. } | MultiGetError::Refused { .. })
        ),
        "{r:?}"
    );
}
