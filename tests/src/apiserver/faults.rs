//! Faults the tests inject into the simulated API server.

use super::*;

/// Faults the tests inject: every answer delayed, the next matching requests
/// answered with an error status, open watch streams cut.
#[derive(Default)]
pub struct Faults {
    pub(crate) delay: Mutex<Duration>,
    pub(crate) rules: Mutex<Vec<FailRule>>,
    pub(crate) cut: Mutex<Option<broadcast::Sender<()>>>,
    pub(crate) requests: std::sync::atomic::AtomicU64,
    /// (method, path?query) of every request, in order.
    pub(crate) log: Mutex<Vec<(String, String)>>,
}

pub(crate) struct FailRule {
    pub(crate) method: String,
    pub(crate) path_contains: String,
    pub(crate) status: StatusCode,
    pub(crate) remaining: u32,
}

impl Faults {
    /// Every answer from now on waits `d` first (zero: back to normal).
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().expect("faults") = d;
    }
    /// The next `times` requests with `method` (or any, with "*") whose path
    /// contains `path_contains` are answered with `status` and a Status body.
    pub fn fail_next(&self, method: &str, path_contains: &str, status: u16, times: u32) {
        self.rules.lock().expect("faults").push(FailRule {
            method: method.to_string(),
            path_contains: path_contains.to_string(),
            status: StatusCode::from_u16(status).expect("valid status"),
            remaining: times,
        });
    }
    /// Ends every open watch stream now, as a dropped connection or an API
    /// server restart would; the client sees the stream end.
    pub fn cut_watches(&self) {
        if let Some(tx) = self.cut.lock().expect("faults").as_ref() {
            let _ = tx.send(());
        }
    }
    /// Requests served so far (to count a client's calls).
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// How many requests had `method` and a path containing `path_contains`.
    pub fn requests_matching(&self, method: &str, path_contains: &str) -> usize {
        self.log
            .lock()
            .expect("faults")
            .iter()
            .filter(|(m, p)| {
                m == method && p.split('?').next().unwrap_or("").contains(path_contains)
            })
            .count()
    }
    /// Every request so far as (method, path?query), in order.
    pub fn request_log(&self) -> Vec<(String, String)> {
        self.log.lock().expect("faults").clone()
    }
    /// The next `times` matching requests get `200 OK` with a body that is not JSON.
    pub fn garbage_next(&self, method: &str, path_contains: &str, times: u32) {
        self.fail_next(method, path_contains, 200, times);
    }
    pub(crate) fn take_failure(&self, method: &str, path: &str) -> Option<StatusCode> {
        let mut rules = self.rules.lock().expect("faults");
        let i = rules.iter().position(|r| {
            r.remaining > 0
                && (r.method == "*" || r.method.eq_ignore_ascii_case(method))
                && path.contains(&r.path_contains)
        })?;
        rules[i].remaining -= 1;
        let status = rules[i].status;
        rules.retain(|r| r.remaining > 0);
        Some(status)
    }
    pub(crate) fn cut_receiver(&self) -> broadcast::Receiver<()> {
        self.cut
            .lock()
            .expect("faults")
            .get_or_insert_with(|| broadcast::channel(4).0)
            .subscribe()
    }
}

/// The fault middleware: counts, delays, and answers injected errors.
pub(crate) async fn inject_faults(
    State(api): State<ApiServer>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let faults = &api.faults;
    faults
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    faults
        .log
        .lock()
        .expect("faults")
        .push((req.method().to_string(), req.uri().to_string()));
    let delay = *faults.delay.lock().expect("faults");
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = req.uri().path().to_string();
    if let Some(code) = faults.take_failure(req.method().as_str(), &path) {
        if code == StatusCode::OK {
            return (
                StatusCode::OK,
                [("content-type", "application/json")],
                "<html><body>captive portal</body></html>\n{\"kind\": \"Nod",
            )
                .into_response();
        }
        let reason = match code.as_u16() {
            409 => "Conflict",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        return status(
            code,
            reason,
            format!("injected by the lab: {} {path}", req.method()),
            json!({}),
        );
    }
    next.run(req).await
}
