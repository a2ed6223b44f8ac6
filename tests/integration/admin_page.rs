//! The admin page (`/admin`) driven in headless Chromium through chromedriver (Debian:
//! `chromium` and `chromium-driver`): with the admin token, a user toggles a plugin, fills its
//! config form with an invalid value (the error is shown at the field) and then a valid one,
//! reads its logs and builds, uploads an archive and uninstalls it.

use crate::support::{BUILD_DEADLINE, EDIT_DEADLINE, TestServer, cluster, crate_archive, crate_source};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

const TOKEN: &str = "s3cret-admin";
const TIMES: &str = "#config-form [name=times]";
const TIMES_ERROR: &str = "#config-form div:has(> [name=times]) .field-error";

/// chromedriver in a process group of its own (with the Chromium it starts), killed on drop.
struct Driver(std::process::Child);

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test started; no memory is involved.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

async fn browser() -> (Driver, Client) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let driver = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .expect("chromedriver is not installed (Debian: apt-get install chromium chromium-driver)");
    let driver = Driver(driver);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1100"] }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session");
    (driver, client)
}

/// Waits until `css` matches an element whose text satisfies `ok`: that text.
async fn text_of(client: &Client, css: &str, deadline: Duration, ok: impl Fn(&str) -> bool) -> String {
    let until = Instant::now() + deadline;
    let mut last = String::from("(no element)");
    loop {
        if let Ok(el) = client.find(Locator::Css(css)).await
            && let Ok(text) = el.text().await
        {
            if ok(&text) {
                return text;
            }
            last = text;
        }
        assert!(Instant::now() < until, "{css}: still {last:?} after {deadline:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn click(client: &Client, css: &str) {
    client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).click().await.unwrap();
}

async fn attr(client: &Client, css: &str, name: &str) -> Option<String> {
    client.find(Locator::Css(css)).await.unwrap().attr(name).await.unwrap()
}

async fn fill(client: &Client, css: &str, text: &str) {
    let el = client.find(Locator::Css(css)).await.unwrap();
    el.clear().await.unwrap();
    el.send_keys(text).await.unwrap();
}

async fn admin_get(server: &TestServer, path: &str) -> Value {
    let resp = server.http.get(server.url(path)).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200, "GET {path}");
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_page_drives_plugins_in_a_real_browser() {
    let server =
        TestServer::start_with(cluster().await, &["hello", "configured"], |c| c.admin_token = Some(TOKEN.into())).await;
    for path in ["/hello", "/configured"] {
        server.wait_until(path, BUILD_DEADLINE, || async { server.get(path).await.0 == 200 }).await;
    }
    let (_driver, client) = browser().await;
    client.goto(&server.url("/admin")).await.unwrap();

    // Without the token the page says what it needs; with it, the plugins appear.
    text_of(&client, "#status", EDIT_DEADLINE, |t| t.contains("admin token")).await;
    fill(&client, "#token", TOKEN).await;
    click(&client, "#token-form button[type=submit]").await;
    for name in ["hello", "configured"] {
        text_of(&client, &format!("tr[data-name={name}] [data-field=state]"), EDIT_DEADLINE, |t| t == "loaded").await;
    }

    // Every form control has a label; every button has a name.
    let unlabelled = client
        .execute(
            "return [...document.querySelectorAll('input, select, textarea')].filter(e => !e.labels || !e.labels.length).map(e => e.id)
                .concat([...document.querySelectorAll('button')].filter(b => !(b.getAttribute('aria-label') || b.textContent.trim())).map(b => b.outerHTML));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(unlabelled, json!([]), "controls without a label or name");

    // Toggle off and on: the row, and what the server serves, follow.
    click(&client, "tr[data-name=hello] button[data-action=toggle]").await;
    text_of(&client, "tr[data-name=hello] [data-field=state]", EDIT_DEADLINE, |t| t == "inactive").await;
    assert_eq!(server.get("/hello").await.0, 404);
    assert_eq!(
        attr(&client, "tr[data-name=hello] button[data-action=toggle]", "aria-label").await.as_deref(),
        Some("Turn on hello")
    );
    click(&client, "tr[data-name=hello] button[data-action=toggle]").await;
    text_of(&client, "tr[data-name=hello] [data-field=state]", BUILD_DEADLINE, |t| t == "loaded").await;
    assert_eq!(server.get("/hello").await.0, 200);

    // The config form is made from the configSchema: a sensitive field is a password input; an
    // invalid value is refused with the message at its field, and nothing changes.
    click(&client, "tr[data-name=configured] button[data-action=open]").await;
    text_of(&client, "#detail-heading", EDIT_DEADLINE, |t| t == "configured").await;
    text_of(&client, TIMES, EDIT_DEADLINE, |_| true).await;
    let label =
        client.execute(&format!("return document.querySelector('{TIMES}').labels[0].textContent"), vec![]).await;
    assert_eq!(label.unwrap(), "times");
    assert_eq!(attr(&client, "#config-form [name=api_key]", "type").await.as_deref(), Some("password"));
    assert_eq!(attr(&client, TIMES, "type").await.as_deref(), Some("number"));
    fill(&client, TIMES, "0").await;
    click(&client, "#config-form button[type=submit]").await;
    let error = text_of(&client, TIMES_ERROR, EDIT_DEADLINE, |t| !t.is_empty()).await;
    assert!(error.contains("minimum"), "{error}");
    assert_eq!(attr(&client, TIMES, "aria-invalid").await.as_deref(), Some("true"));
    // The README's picture (KILN_SCREENSHOT_DIR=$PWD/docs cargo test … admin_page).
    if let Ok(dir) = std::env::var("KILN_SCREENSHOT_DIR") {
        let png = client.screenshot().await.unwrap();
        std::fs::write(std::path::Path::new(&dir).join("admin-page.png"), png).unwrap();
    }
    assert_eq!(server.get("/configured").await.1["times"], 1, "an invalid config is not applied");
    fill(&client, TIMES, "3").await;
    fill(&client, "#config-form [name=greeting]", "howdy").await;
    click(&client, "#config-form button[type=submit]").await;
    text_of(&client, "#status", EDIT_DEADLINE, |t| t.contains("saved and applied")).await;
    let now = server.get("/configured").await.1;
    assert_eq!((&now["times"], &now["greeting"]), (&json!(3), &json!("howdy")), "{now}");
    assert_eq!(admin_get(&server, "/plugins/configured/config").await["config"]["times"], 3);
    // Only what the user set is stored: the defaults are not pinned into the row.
    let stored: serde_json::Value =
        server.sql().await.query_one("SELECT config FROM plugins WHERE name = 'configured'", &[]).await.unwrap().get(0);
    assert_eq!(stored, json!({ "times": 3, "greeting": "howdy" }));

    // Logs and builds of a plugin.
    assert_eq!(server.get("/hello/browser").await.0, 200);
    click(&client, "tr[data-name=hello] button[data-action=open]").await;
    text_of(&client, "#logs tbody", EDIT_DEADLINE, |t| t.contains("greeted") && t.contains("browser")).await;
    text_of(&client, "#builds", EDIT_DEADLINE, |t| t.contains("built in") || t.contains("No builds recorded")).await;

    // Upload an archive; it builds, and its row appears; then uninstall it.
    let files = tempfile::tempdir().unwrap();
    let archive = files.path().join("powertable.tar.gz");
    std::fs::write(&archive, crate_archive(&crate_source("powertable"), "powertable")).unwrap();
    client.find(Locator::Css("#archive")).await.unwrap().send_keys(&archive.to_string_lossy()).await.unwrap();
    click(&client, "#upload-form button[type=submit]").await;
    text_of(&client, "tr[data-name=powertable] [data-field=state]", BUILD_DEADLINE, |t| t == "loaded").await;
    text_of(&client, "#status", EDIT_DEADLINE, |t| t.contains("Installed powertable")).await;
    assert_eq!(admin_get(&server, "/plugins/powertable").await["origin"], "upload");
    click(&client, "tr[data-name=powertable] button[data-action=uninstall]").await;
    client.accept_alert().await.unwrap();
    text_of(&client, "#status", BUILD_DEADLINE, |t| t.contains("powertable is uninstalled")).await;
    // The page says so before its table is refreshed: the row goes a moment later.
    let until = Instant::now() + EDIT_DEADLINE;
    loop {
        let rows = client.find_all(Locator::Css("tr[data-name=powertable]")).await.unwrap();
        if rows.is_empty() || Instant::now() >= until {
            assert!(rows.is_empty(), "the row is gone from the table");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = server.get("/plugins/powertable").await;
    assert_eq!(status, 401, "(and from the server: without the token the API refuses)");
    let resp = server.http.get(server.url("/plugins/powertable")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 404);

    // The page's own answers: a strict policy, no external resource.
    let page = reqwest::get(server.url("/admin")).await.unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(!page.text().await.unwrap().contains("http"), "no external resources");
    let violations = client.execute("return window.cspViolations", vec![]).await.unwrap();
    assert_eq!(violations, json!(0), "the page needs nothing its policy forbids");
    client.close().await.unwrap();
}
