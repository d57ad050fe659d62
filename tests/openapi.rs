//! `GET /openapi.json` on a running ingress: served without credentials, OpenAPI 3.1, and
//! every operation it documents is routed by the server as it runs (middleware and
//! fallbacks included): calling it never lands in the "unknown route" 404 or the
//! "method not allowed" 405. That the document lists every registered route is checked
//! by the unit test `ingress::openapi::tests::route_table_matches_the_document`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Stack, StackOptions};
use serde_json::Value;

#[tokio::test]
async fn the_served_document_covers_routes_the_server_answers() {
    let stack = Stack::start(StackOptions::default()).await;
    let response = stack
        .http
        .get(format!("{}/openapi.json", stack.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let doc: Value = response.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() > 40, "only {} paths", paths.len());

    let mut checked = 0;
    for (path, item) in paths {
        // Any id: an unknown one is a 404 of the route itself, not of the router.
        let url = format!(
            "{}{}",
            stack.base,
            path.replace("{id}", "00000000-0000-0000-0000-000000000000")
        );
        for method in item.as_object().unwrap().keys() {
            let method =
                reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            // No credentials and no body: every route answers at once (401, 400, 404, ...).
            let response = stack
                .http
                .request(method.clone(), &url)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            let code = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
            assert_ne!(status, 405, "{method} {path} is not routed: {body}");
            assert!(
                !(status == 404 && code.as_deref() == Some("unknown_url")),
                "{method} {path} is not routed: {body}"
            );
            assert!(status < 500, "{method} {path} answered {status}: {body}");
            checked += 1;
        }
    }
    assert!(checked > 80, "only {checked} operations checked");
}

/// Schemathesis's first finding: a NUL character (`\u0000`) in JSON text reached Postgres,
/// which cannot store it in text, and the query failed as a 500. Bodies and query strings
/// of the management API now refuse it with a 400 that says so.
#[tokio::test]
async fn text_with_nul_is_a_400_not_a_500() {
    let stack = Stack::start(StackOptions::default()).await;
    let admin = format!("Bearer {}", common::ADMIN_TOKEN);
    let bodies = [
        (
            "/api/admin/keys",
            r#"{"name":"k","allowed_models":["a\u0000b"]}"#,
        ),
        ("/api/admin/users", r#"{"name":"n\u0000"}"#),
        (
            "/api/auth/login",
            r#"{"login":"x\u0000","password":"secret-password"}"#,
        ),
    ];
    for (path, body) in bodies {
        let response = stack
            .http
            .post(format!("{}{path}", stack.base))
            .header("authorization", &admin)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let error: Value = response.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("NUL"), "{path}: {message}");
    }
    // An escaped backslash before `u0000` is plain text.
    let response = stack
        .http
        .post(format!("{}/api/admin/keys", stack.base))
        .header("authorization", &admin)
        .header("content-type", "application/json")
        .body(r#"{"name":"not a NUL: \\u0000"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let response = stack
        .http
        .get(format!("{}/api/admin/prices?model=a%00b", stack.base))
        .header("authorization", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("NUL"));
}
