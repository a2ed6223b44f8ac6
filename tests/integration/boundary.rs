//! The plugin boundary under abuse, end to end over HTTP: header injection, panics whose
//! payload panics again, and request header values as the client sent them.

use crate::support::TestServer;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn the_boundary_holds_against_injection_panicking_payloads_and_odd_headers() {
    let server = TestServer::start(&["panicky"]).await;
    server.wait_state("panicky", "loaded").await;

    // A newline in a header value is refused, never a second header.
    let resp = server.http.get(server.url("/panicky/inject?v=x%0Aset-cookie%0Asession=attacker")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 500);
    assert!(resp.headers().get("set-cookie").is_none(), "{:?}", resp.headers());
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "PluginError", "{body}");
    let resp = server.http.get(server.url("/panicky/inject?v=plain")).send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.headers()["x-echo"].as_bytes()), (200, &b"plain"[..]));

    // A panic payload whose drop panics costs that request only.
    let (status, body) = server.get("/panicky/bomb").await;
    assert_eq!((status, body["error"].as_str()), (500, Some("PluginError")), "{body}");
    assert_eq!(server.get("/panicky/ok").await, (200, json!("still fine")));

    // UTF-8 header values reach the plugin; other bytes come as bytes.
    let echo = |value: &'static [u8]| {
        let req = server.http.get(server.url("/panicky/echo")).header("x-name", value).header("X-Other", "2");
        async move { req.send().await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    let all = json!(["x-name=plain", "x-other=2"]);
    assert_eq!(echo(b"plain").await, json!({ "text": "plain", "bytes": b"plain", "x": all }), "names lower case");
    assert_eq!(echo("José".as_bytes()).await["bytes"], json!("José".as_bytes()));
    assert_eq!(echo(b"\xff").await["text"], json!(null), "not UTF-8: no text, but the bytes");
    assert_eq!(echo(b"\xff").await["bytes"], json!([255]));
}
