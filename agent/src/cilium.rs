//! Cilium's own word on its health: `GET /v1/healthz` on the Cilium agent's
//! API socket (`/var/run/cilium/cilium.sock`, under the host root).
//!
//! The answer is Cilium's `StatusResponse` model: `cilium.state` is `Ok`,
//! `Warning`, `Failure` or `Disabled` with a `msg`, and
//! `cluster.ciliumHealth` (the health checker) has the same shape when
//! present. The request is one HTTP/1.0 exchange with a short deadline on
//! every read and write — the socket belongs to another program, and a hung
//! or garbage answer must be a precise failure, never a hang or a pass.
//! (Hand-written rather than hyper: one synchronous request from a probe
//! thread, no connection reuse, bounded size.)

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::host::HostPaths;

/// The socket, relative to the host root.
pub const SOCKET: &str = "var/run/cilium/cilium.sock";
/// How long Cilium has to answer, all told.
pub const DEADLINE: Duration = Duration::from_secs(2);
/// A healthz answer is a few KiB; anything far bigger is not Cilium.
const MAX_ANSWER: u64 = 1024 * 1024;

/// One of Cilium's `Status` objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: String,
    pub msg: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiliumHealth {
    /// The socket path on the node.
    pub socket: String,
    /// A socket (or something) exists at that path.
    pub present: bool,
    /// `cilium` from the answer.
    pub cilium: Option<Status>,
    /// `cluster.ciliumHealth` from the answer, when present.
    pub cluster_health: Option<Status>,
    /// Why there is no usable answer (refused, hung, garbage, HTTP error).
    pub error: Option<String>,
    pub elapsed_ms: u64,
}

pub fn probe(host: &HostPaths) -> CiliumHealth {
    probe_with(host, DEADLINE)
}

pub fn probe_with(host: &HostPaths, deadline: Duration) -> CiliumHealth {
    let path = host.path(SOCKET);
    let mut h = CiliumHealth {
        socket: format!("/{SOCKET}"),
        present: std::fs::symlink_metadata(&path).is_ok(),
        ..Default::default()
    };
    if !h.present {
        return h;
    }
    let start = Instant::now();
    match ask(&path, deadline) {
        Ok(body) => match parse(&body) {
            Ok((c, ch)) => {
                h.cilium = Some(c);
                h.cluster_health = ch;
            }
            Err(e) => h.error = Some(e),
        },
        Err(e) => h.error = Some(e),
    }
    h.elapsed_ms = start.elapsed().as_millis() as u64;
    h
}

fn ask(path: &std::path::Path, deadline: Duration) -> Result<Vec<u8>, String> {
    let start = Instant::now();
    let left = || {
        deadline
            .checked_sub(start.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                format!(
                    "Cilium's API did not answer GET /v1/healthz within {}",
                    humantime::format_duration(deadline)
                )
            })
    };
    let timed_out = |e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            format!(
                "Cilium's API did not answer GET /v1/healthz within {}",
                humantime::format_duration(deadline)
            )
        } else {
            format!("Cilium's API socket: {e}")
        }
    };
    let mut s = UnixStream::connect(path)
        .map_err(|e| format!("cannot connect to Cilium's API socket: {e}"))?;
    s.set_write_timeout(Some(left()?)).map_err(timed_out)?;
    s.write_all(b"GET /v1/healthz HTTP/1.0\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
        .map_err(timed_out)?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        s.set_read_timeout(Some(left()?)).map_err(timed_out)?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.len() as u64 > MAX_ANSWER {
                    return Err(format!(
                        "Cilium's API answered more than {MAX_ANSWER} bytes; not a healthz answer"
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out(e)),
        }
    }
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            format!(
                "Cilium's API answer is unreadable: not HTTP ({} bytes, no header end)",
                answer.len()
            )
        })?;
    let head = String::from_utf8_lossy(&answer[..head_end]);
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (proto, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !proto.starts_with("HTTP/1.") {
        return Err(format!(
            "Cilium's API answer is unreadable: not HTTP ({status_line:?})"
        ));
    }
    let body = answer[head_end + 4..].to_vec();
    if code != "200" {
        return Err(format!(
            "Cilium's API answered {}: {}",
            status_line
                .split_once(' ')
                .map(|x| x.1)
                .unwrap_or(status_line),
            String::from_utf8_lossy(&body).trim()
        ));
    }
    if head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked")
    {
        return dechunk(&body);
    }
    Ok(body)
}

/// A server may chunk even an HTTP/1.0 answer; decode rather than misread it.
fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let bad = || "Cilium's API answer is unreadable: bad chunked encoding".to_string();
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_txt = String::from_utf8_lossy(&b[..line_end]);
        let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad())?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err(bad());
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn status(v: &serde_json::Value) -> Option<Status> {
    Some(Status {
        state: v.get("state")?.as_str()?.to_string(),
        msg: v
            .get("msg")
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_string(),
    })
}

/// Cilium's `StatusResponse`: `cilium` is required; `cluster.ciliumHealth`
/// optional.
pub fn parse(body: &[u8]) -> Result<(Status, Option<Status>), String> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("Cilium's API answer is unreadable: not JSON ({e})"))?;
    let cilium = v
        .get("cilium")
        .and_then(status)
        .ok_or_else(|| "Cilium's API answer is unreadable: no cilium.state in it".to_string())?;
    const STATES: &[&str] = &["Ok", "Warning", "Failure", "Disabled"];
    if !STATES.contains(&cilium.state.as_str()) {
        return Err(format!(
            "Cilium's API answer is unreadable: unknown cilium.state {:?}",
            cilium.state
        ));
    }
    let cluster = v
        .get("cluster")
        .and_then(|c| c.get("ciliumHealth"))
        .and_then(status);
    Ok((cilium, cluster))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_response_shape() {
        let (c, h) = parse(br#"{"cilium":{"state":"Failure","msg":"kvstore unreachable"},"cluster":{"ciliumHealth":{"state":"Ok"}}}"#).unwrap();
        assert_eq!(
            c,
            Status {
                state: "Failure".into(),
                msg: "kvstore unreachable".into()
            }
        );
        assert_eq!(h.unwrap().state, "Ok");
        assert_eq!(
            parse(b"{}").unwrap_err(),
            "Cilium's API answer is unreadable: no cilium.state in it"
        );
        assert!(parse(b"<html>")
            .unwrap_err()
            .starts_with("Cilium's API answer is unreadable: not JSON ("));
        assert_eq!(
            parse(br#"{"cilium":{"state":"Fine"}}"#).unwrap_err(),
            "Cilium's API answer is unreadable: unknown cilium.state \"Fine\""
        );
    }

    #[test]
    fn chunked_answers_are_decoded() {
        assert_eq!(
            dechunk(b"4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n").unwrap(),
            b"{\"a\":1}"
        );
        assert!(dechunk(b"zz\r\n").is_err());
        assert!(dechunk(b"10\r\nshort").is_err());
    }
}
