//! A real Chromium, headless, driven over the DevTools protocol: for tests
//! of web pages (the `choreo console`, a service's own pages).
//!
//! [`Browser::start`] runs `chromium --headless` with a fresh profile in a
//! temp dir and no network of its own (no sync, no updates, no background
//! requests), on a DevTools port the browser picks and prints; the process
//! is killed on drop. A [`Page`] navigates, evaluates JavaScript, waits for
//! a condition, takes screenshots and reads its JavaScript heap.
//!
//! The binary comes from `$CHROMIUM_BIN`, then `chromium` or
//! `chromium-browser` on `PATH`; no browser is downloaded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::TestkitError;

/// The environment variable naming the Chromium binary.
pub const CHROMIUM_BIN: &str = "CHROMIUM_BIN";

type Pending = Arc<std::sync::Mutex<std::collections::HashMap<u64, oneshot::Sender<Value>>>>;

/// A headless Chromium process and its DevTools connection.
pub struct Browser {
    child: tokio::process::Child,
    conn: Conn,
    _profile: tempfile::TempDir,
}

/// The DevTools connection: commands go out on `tx`; answers come back by
/// id through `pending`.
#[derive(Clone)]
struct Conn {
    tx: mpsc::UnboundedSender<String>,
    pending: Pending,
    next: Arc<AtomicU64>,
}

impl Conn {
    async fn call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, TestkitError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (done, answer) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, done);
        self.tx
            .send(msg.to_string())
            .map_err(|_| browser_failed(format!("{method}: the DevTools connection is closed")))?;
        let reply = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .map_err(|_| browser_failed(format!("{method}: no answer within 30 s")))?
            .map_err(|_| browser_failed(format!("{method}: the DevTools connection closed")))?;
        if let Some(e) = reply.get("error") {
            return Err(browser_failed(format!("{method}: {e}")));
        }
        Ok(reply.get("result").cloned().unwrap_or(Value::Null))
    }
}

fn browser_failed(why: String) -> TestkitError {
    TestkitError::Browser { why }
}

/// Where the Chromium binary is: `$CHROMIUM_BIN`, then `PATH`.
///
/// # Errors
/// [`TestkitError::BrowserNotFound`] with where it looked.
pub fn find_chromium() -> Result<PathBuf, TestkitError> {
    let mut looked = Vec::new();
    if let Some(p) = std::env::var_os(CHROMIUM_BIN) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        looked.push(format!("${CHROMIUM_BIN}={}", p.display()));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
        looked.push(format!("{name} on PATH"));
    }
    Err(TestkitError::BrowserNotFound {
        looked: looked.join(", "),
    })
}

impl Browser {
    /// Starts a headless Chromium (see the module docs).
    ///
    /// # Errors
    /// No Chromium is found, it does not start, or it prints no DevTools
    /// address within 30 s.
    pub async fn start() -> Result<Self, TestkitError> {
        let bin = find_chromium()?;
        let profile = tempfile::Builder::new()
            .prefix("choreo-chromium-")
            .tempdir()
            .map_err(|source| TestkitError::Io {
                what: "make a Chromium profile dir".into(),
                source,
            })?;
        let mut child = tokio::process::Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--hide-scrollbars",
                "--mute-audio",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| TestkitError::Io {
                what: format!("start {}", bin.display()),
                source,
            })?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| browser_failed("no stderr".into()))?;
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        let ws = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(at) = line.find("ws://") {
                    return Some(line[at..].trim().to_owned());
                }
                seen.push(line);
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            browser_failed(format!(
                "{} printed no DevTools address; it said:\n{}",
                bin.display(),
                seen.join("\n")
            ))
        })?;
        // The rest of its stderr is drained so the browser never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let conn = connect(&ws).await?;
        Ok(Self {
            child,
            conn,
            _profile: profile,
        })
    }

    /// Opens a new tab at `url` and waits for it to load.
    ///
    /// # Errors
    /// The browser refuses, or the page does not load within 30 s.
    pub async fn open(&self, url: &str) -> Result<Page, TestkitError> {
        let target = self
            .conn
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"].as_str().unwrap_or_default().to_owned();
        let attached = self
            .conn
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let page = Page {
            conn: self.conn.clone(),
            session,
            lock: Arc::new(Mutex::new(())),
        };
        page.call("Page.enable", json!({})).await?;
        // A fixed viewport: screenshots never see a window not laid out yet.
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await?;
        page.call("Runtime.enable", json!({})).await?;
        page.goto(url).await?;
        Ok(page)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Only the process this testkit started, by its handle.
        let _ = self.child.start_kill();
    }
}

async fn connect(ws: &str) -> Result<Conn, TestkitError> {
    let builder = tokio_websockets::ClientBuilder::new()
        .uri(ws)
        .map_err(|e| browser_failed(format!("bad DevTools address {ws}: {e}")))?
        .limits(tokio_websockets::Limits::default().max_payload_len(Some(64 << 20)));
    let (stream, _) = builder
        .connect()
        .await
        .map_err(|e| browser_failed(format!("cannot connect to DevTools at {ws}: {e}")))?;
    let (mut sink, mut source) = stream.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(tokio_websockets::Message::text(m)).await.is_err() {
                break;
            }
        }
    });
    let pending: Pending = Arc::default();
    let answers = pending.clone();
    tokio::spawn(async move {
        while let Some(Ok(m)) = source.next().await {
            let Some(text) = m.as_text() else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            // Events (no id) are not needed: pages are read by evaluation.
            if let Some(id) = v.get("id").and_then(Value::as_u64) {
                let waiting = answers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&id);
                if let Some(w) = waiting {
                    let _ = w.send(v);
                }
            }
        }
    });
    Ok(Conn {
        tx,
        pending,
        next: Arc::new(AtomicU64::new(1)),
    })
}

/// One tab of a [`Browser`].
#[derive(Clone)]
pub struct Page {
    conn: Conn,
    session: String,
    lock: Arc<Mutex<()>>,
}

impl Page {
    async fn call(&self, method: &str, params: Value) -> Result<Value, TestkitError> {
        self.conn.call(Some(&self.session), method, params).await
    }

    /// Navigates to `url` and waits until the document has loaded.
    ///
    /// # Errors
    /// The navigation fails (the answer's `errorText`), or the page does
    /// not load within 30 s.
    pub async fn goto(&self, url: &str) -> Result<(), TestkitError> {
        let _one = self.lock.lock().await;
        let r = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(e) = r.get("errorText").and_then(Value::as_str) {
            return Err(browser_failed(format!("cannot open {url}: {e}")));
        }
        drop(_one);
        self.wait_for(
            "document.readyState === 'complete' && location.href !== 'about:blank'",
            Duration::from_secs(30),
        )
        .await
        .map(|_| ())
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns
    /// its value as JSON.
    ///
    /// # Errors
    /// The expression throws: the exception's text.
    pub async fn eval(&self, expression: &str) -> Result<Value, TestkitError> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            let text = e["exception"]["description"]
                .as_str()
                .or_else(|| e["text"].as_str())
                .unwrap_or("an exception");
            return Err(browser_failed(format!("{expression}: {text}")));
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Evaluates `expression` every 50 ms until it is truthy, and returns
    /// its value.
    ///
    /// # Errors
    /// It is not truthy within `within`: the error says the expression and
    /// the page's text at the end.
    pub async fn wait_for(
        &self,
        expression: &str,
        within: Duration,
    ) -> Result<Value, TestkitError> {
        let end = tokio::time::Instant::now() + within;
        loop {
            // A page that is navigating may not answer yet: try again.
            if let Ok(v) = self.eval(expression).await {
                let truthy = !matches!(&v, Value::Null | Value::Bool(false))
                    && v != json!(0)
                    && v != json!("");
                if truthy {
                    return Ok(v);
                }
            }
            if tokio::time::Instant::now() >= end {
                let text = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await
                    .unwrap_or_default();
                return Err(browser_failed(format!(
                    "`{expression}` was not true within {within:?}; the page read:\n{}",
                    text.as_str().unwrap_or_default()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the first element matching the CSS `selector`.
    ///
    /// # Errors
    /// No element matches.
    pub async fn click(&self, selector: &str) -> Result<(), TestkitError> {
        let sel = serde_json::to_string(selector).unwrap_or_default();
        let found = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return false; e.click(); return true; }})()"
            ))
            .await?;
        if found != json!(true) {
            return Err(browser_failed(format!("nothing matches {selector}")));
        }
        Ok(())
    }

    /// Saves a PNG of the page as it is now (the whole page, not only the
    /// window).
    ///
    /// # Errors
    /// The browser cannot capture it, or the file cannot be written.
    pub async fn screenshot(&self, path: &Path) -> Result<(), TestkitError> {
        // A page between two layouts can have no size yet ("Cannot take
        // screenshot with 0 width", seen in CI): try again for up to 5 s.
        // A tab behind another one is not laid out: bring it forward.
        self.call("Page.bringToFront", json!({})).await?;
        let mut tries = 0;
        let r = loop {
            match self
                .call(
                    "Page.captureScreenshot",
                    json!({ "format": "png", "captureBeyondViewport": true }),
                )
                .await
            {
                Err(TestkitError::Browser { why }) if why.contains("0 width") && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other?,
            }
        };
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap_or_default())
            .map_err(|e| browser_failed(format!("a screenshot that is not base64: {e}")))?;
        std::fs::write(path, png).map_err(|source| TestkitError::Io {
            what: format!("write {}", path.display()),
            source,
        })
    }

    /// The page's JavaScript heap in use, in bytes, after a garbage
    /// collection.
    ///
    /// # Errors
    /// The browser does not answer.
    pub async fn heap_used(&self) -> Result<u64, TestkitError> {
        self.call("HeapProfiler.collectGarbage", json!({})).await?;
        let r = self.call("Runtime.getHeapUsage", json!({})).await?;
        Ok(r["usedSize"].as_f64().unwrap_or_default() as u64)
    }
}
