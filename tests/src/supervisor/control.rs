//! The control socket (`DIR/control.sock`): one JSON request line, one reply line;
//! and `status`, from the same facts kubectl and the agents see.

use super::*;

impl Lab {
    pub(super) fn status(&mut self) -> Vec<StatusRow> {
        let api_nodes = self.api.list("nodes");
        let pods = self.api.list("pods");
        (0..self.nodes.len())
            .map(|i| {
                let n = &self.nodes[i];
                let api = api_nodes
                    .iter()
                    .find(|a| a["metadata"]["name"] == n.rec.name.as_str());
                let ready = api
                    .map(|a| a["status"]["conditions"][0]["status"] == "True")
                    .unwrap_or(false);
                let cordoned = api.is_some_and(|a| a["spec"]["unschedulable"] == json!(true));
                let cilium = pods
                    .iter()
                    .find(|p| {
                        p["spec"]["nodeName"] == n.rec.name.as_str()
                            && p["metadata"]["ownerReferences"][0]["name"] == CILIUM_DS
                    })
                    .map(|p| {
                        if let Some(w) = p["status"]["containerStatuses"][0]["state"]["waiting"]
                            ["reason"]
                            .as_str()
                        {
                            format!(
                                "{w} ({} restarts)",
                                p["status"]["containerStatuses"][0]["restartCount"]
                            )
                        } else if pod_ready(p) {
                            "Ready".into()
                        } else {
                            "NotReady".into()
                        }
                    })
                    .unwrap_or_else(|| "none".into());
                let backend = if n.restart_until.is_some() {
                    "restarting".to_string()
                } else {
                    n.backend.to_string()
                };
                let faults: Vec<String> = n.faults.iter().map(Fault::to_string).collect();
                let row = StatusRow {
                    node: n.rec.name.clone(),
                    role: n.rec.role.to_string(),
                    backend,
                    ready,
                    cordoned,
                    cilium,
                    agent: String::new(),
                    etcd: String::new(),
                    faults,
                };
                (i, row)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|(i, mut row)| {
                row.agent = self.agent_state(i);
                row.etcd = self.etcd_state(i);
                row
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusRow {
    pub node: String,
    pub role: String,
    pub backend: String,
    pub ready: bool,
    pub cordoned: bool,
    pub cilium: String,
    pub agent: String,
    /// A controller's etcd member: running, starting, stopped; `-` on a worker.
    #[serde(default)]
    pub etcd: String,
    pub faults: Vec<String>,
}

/// One request on the control socket (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Deploy { node: String },
    Rollback { node: String },
    Fault { node: String, kind: Fault },
    Clear { node: Option<String> },
    Status,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Reply {
    pub ok: bool,
    pub message: String,
    /// The hook must never return (hook-hangs).
    pub hang: bool,
    pub rows: Vec<StatusRow>,
}

impl Reply {
    pub(super) fn ok(message: String) -> Reply {
        Reply {
            ok: true,
            message,
            ..Default::default()
        }
    }
    pub(super) fn fail(message: String) -> Reply {
        Reply {
            ok: false,
            message,
            ..Default::default()
        }
    }
}

pub(super) fn serve_control(lab: &Arc<Mutex<Lab>>, conn: UnixStream) -> Result<()> {
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let mut restarting = None;
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Reply::fail(format!("bad request: {e}")),
        Ok(req) => {
            let mut lab = lab.lock().expect("lab");
            if let Request::Rollback { node } = &req {
                restarting = lab.node_index(node).ok();
            }
            let r = match req {
                Request::Deploy { node } => lab.deploy(&node),
                Request::Rollback { node } => lab.rollback(&node),
                Request::Fault { node, kind } => lab
                    .set_fault(&node, kind, true)
                    .map(|()| Reply::ok(format!("{node}: {kind} on"))),
                Request::Clear { node } => (|| {
                    let names: Vec<String> = lab
                        .nodes
                        .iter()
                        .filter(|n| node.as_deref().is_none_or(|m| m == n.rec.name))
                        .map(|n| n.rec.name.clone())
                        .collect();
                    if names.is_empty() {
                        bail!("{} is not a node of this lab", node.unwrap_or_default());
                    }
                    for n in &names {
                        let i = lab.node_index(n)?;
                        let fs: Vec<Fault> = lab.nodes[i].faults.iter().copied().collect();
                        for f in fs {
                            lab.set_fault(n, f, false)?;
                        }
                    }
                    Ok(Reply::ok(format!("faults cleared on {}", names.join(", "))))
                })(),
                Request::Status => Ok(Reply {
                    ok: true,
                    rows: lab.status(),
                    ..Default::default()
                }),
            };
            r.unwrap_or_else(|e| Reply::fail(format!("{e:#}")))
        }
    };
    // A rollback answers once the node's k3s is up again, as the real one
    // does: `switch-to-configuration` returns when systemd's restart job of
    // the k3s unit (Type=notify) is done, by which time k3s has written
    // containerd's config for the backend it took. Whoever asks the node
    // right after the rollback then sees what it runs now.
    let mut reply = reply;
    if let (Some(i), true) = (restarting, reply.ok) {
        let until = Instant::now() + RESTART * 10;
        while Instant::now() < until && lab.lock().expect("lab").nodes[i].restart_until.is_some() {
            std::thread::sleep(TICK);
        }
        let lab = lab.lock().expect("lab");
        let n = &lab.nodes[i];
        reply.message = match (n.restart_until.is_some(), n.backend) {
            (true, _) => format!("{}; k3s still restarting", reply.message),
            (false, Backend::Flannel) => format!("{}; k3s restarted, on Flannel", reply.message),
            (false, Backend::None) => format!(
                "{}; k3s restarted without Flannel (a k3s agent takes the backend from the servers)",
                reply.message
            ),
        };
    }
    let mut w = &conn;
    writeln!(w, "{}", serde_json::to_string(&reply)?)?;
    Ok(())
}

/// Sends `req` to the lab in `dir` and returns its reply.
pub fn request(dir: &Path, req: &Request) -> Result<Reply> {
    let sock = dir.join("control.sock");
    let conn = UnixStream::connect(&sock).with_context(|| {
        format!(
            "no lab supervisor answers on {} (is a lab up there? `cnishift-lab up -i INVENTORY --dir {}`)",
            sock.display(),
            dir.display()
        )
    })?;
    let mut w = &conn;
    writeln!(w, "{}", serde_json::to_string(req)?)?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    serde_json::from_str(&line).context("the supervisor's reply")
}
