//! One node's k3s, kubelet, DaemonSet controller and Cilium, played every tick;
//! deploy and rollback as `just nix deploy` and the k3s restart would do them.

use super::*;

impl Lab {
    pub(super) fn restart_k3s(&mut self, i: usize) {
        self.nodes[i].restart_until = Some(Instant::now() + RESTART);
        let name = self.nodes[i].rec.name.clone();
        self.api.set_node_condition(
            &name,
            false,
            "KubeletNotReady",
            "container runtime is down: k3s is restarting",
        );
    }

    /// The backend a k3s starting now on node `i` takes.
    pub(super) fn backend_at_start(&self, i: usize) -> Backend {
        match self.nodes[i].rec.role {
            Role::Controller => {
                if self.nodes[i].flags_none {
                    Backend::None
                } else {
                    Backend::Flannel
                }
            }
            // A k3s agent takes the backend from the servers: without Flannel
            // as soon as one server it may join runs without it.
            Role::Worker => {
                if self
                    .nodes
                    .iter()
                    .any(|n| n.rec.role == Role::Controller && n.backend == Backend::None)
                {
                    Backend::None
                } else {
                    Backend::Flannel
                }
            }
        }
    }

    /// One line per deploy or rollback the lab was asked for, appended to
    /// `DIR/logs/hooks.log` as `<unix ms> <verb> <node> <outcome>`: how a
    /// person (or the kill tests) counts what ran on a node, e.g. a deploy
    /// that a resumed `migrate` ran again because its outcome was never
    /// journaled.
    fn log_hook(&self, verb: &str, node: &str, outcome: &str) {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let line = format!("{ms} {verb} {node} {outcome}\n");
        let _ = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.rec.dir.join("logs").join(HOOK_LOG))
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }

    /// What `just nix deploy` + the k3s restart do to a node.
    pub(super) fn deploy(&mut self, node: &str) -> Result<Reply> {
        let i = self.node_index(node)?;
        if self.nodes[i].faults.contains(&Fault::HookFails) {
            self.log_hook("deploy", node, "failed (hook-fails)");
            return Ok(Reply::fail(format!(
                "deploy {node}: switch-to-configuration failed (injected by the lab: hook-fails)"
            )));
        }
        if self.nodes[i].faults.contains(&Fault::HookHangs) {
            self.log_hook("deploy", node, "hangs (hook-hangs)");
            return Ok(Reply {
                hang: true,
                ..Reply::ok(String::new())
            });
        }
        self.log_hook("deploy", node, "switched");
        self.nodes[i].flags_none = true;
        let root = self.nodes[i].rec.host_root.clone();
        k3s::write_flags(&root, self.nodes[i].rec.role, true)?;
        self.restart_k3s(i);
        if self.nodes[i].faults.contains(&Fault::Unconfirmed) {
            self.set_cut(i, true)?;
        }
        Ok(Reply::ok(format!("{node}: k3s flags switched to --flannel-backend=none --disable-network-policy; k3s restarting")))
    }

    pub(super) fn rollback(&mut self, node: &str) -> Result<Reply> {
        let i = self.node_index(node)?;
        self.log_hook("rollback", node, "switched back");
        self.nodes[i].flags_none = false;
        let root = self.nodes[i].rec.host_root.clone();
        k3s::write_flags(&root, self.nodes[i].rec.role, false)?;
        if self.nodes[i].rec.role == Role::Worker {
            // The worker's previous generation: Flannel, whatever the servers say.
            self.nodes[i].backend = Backend::Flannel;
        }
        self.restart_k3s(i);
        // The generation that cut the node off is gone: reachable again
        // (a partition, which is not the deploy's doing, stays).
        if !self.nodes[i].faults.contains(&Fault::Partition) {
            self.set_cut(i, false)?;
        }
        Ok(Reply::ok(format!("{node}: k3s flags back to Flannel")))
    }

    pub(super) fn start_health(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].health.is_some() {
            return Ok(());
        }
        let path = self.nodes[i].rec.host_root.join(k3s::CILIUM_SOCKET);
        fs::create_dir_all(path.parent().expect("parent"))?;
        let _ = fs::remove_file(&path);
        let state = self.nodes[i].health_state.clone();
        let listener = {
            let _g = self.rt.enter();
            tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("binding {}", path.display()))?
        };
        let app = axum::Router::new().route(
            "/v1/healthz",
            axum::routing::get(move || {
                let state = state.clone();
                async move {
                    let (s, msg) = state.lock().expect("health").clone();
                    (
                        [("content-type", "application/json")],
                        json!({
                            "cilium": {"state": s, "msg": msg},
                            "cluster": {"ciliumHealth": {"state": s}},
                            "kubernetes": {"state": "Ok", "msg": "1.33"},
                        })
                        .to_string(),
                    )
                }
            }),
        );
        let task = self.rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        self.nodes[i].health = Some(task.abort_handle());
        Ok(())
    }

    pub(super) fn stop_health(&mut self, i: usize) {
        if let Some(h) = self.nodes[i].health.take() {
            h.abort();
        }
        let _ = fs::remove_file(self.nodes[i].rec.host_root.join(k3s::CILIUM_SOCKET));
    }

    /// One round of k3s, kubelet, DaemonSet controller and Cilium, for every node.
    pub(super) fn tick(&mut self) {
        let now = Instant::now();
        let pods = self.api.list("pods");
        let dss = self.api.list("daemonsets");
        let api_nodes = self.api.list("nodes");
        for i in 0..self.nodes.len() {
            let _ = self.tick_node(i, now, &pods, &dss, &api_nodes);
        }
    }

    pub(super) fn tick_node(
        &mut self,
        i: usize,
        now: Instant,
        pods: &[Value],
        dss: &[Value],
        api_nodes: &[Value],
    ) -> Result<()> {
        let name = self.nodes[i].rec.name.clone();
        let root = self.nodes[i].rec.host_root.clone();
        let netns = self.nodes[i].rec.netns.clone();
        // k3s restart completes: the backend it starts with, its containerd config.
        if self.nodes[i].restart_until.is_some_and(|t| now >= t) {
            self.nodes[i].restart_until = None;
            self.nodes[i].started_at = now;
            let backend = self.backend_at_start(i);
            let was = self.nodes[i].backend;
            self.nodes[i].backend = backend;
            k3s::write_containerd_config(&root, backend)?;
            if backend == Backend::Flannel && was == Backend::None {
                self.tear_down_cilium(i);
            }
            // A worker whose k3s restarts as soon as a server leaves Flannel.
            if self.nodes[i].rec.role == Role::Controller && backend == Backend::None {
                for j in 0..self.nodes.len() {
                    if self.nodes[j].faults.contains(&Fault::WorkerRestartsEarly)
                        && self.nodes[j].restart_until.is_none()
                        && self.nodes[j].backend == Backend::Flannel
                    {
                        self.restart_k3s(j);
                    }
                }
            }
        }
        let restarting = self.nodes[i].restart_until.is_some();
        if !restarting && now.duration_since(self.nodes[i].lease_at) >= LEASE_EVERY {
            self.nodes[i].lease_at = now;
            self.api.renew_node_lease(&name);
        }
        let Some(api_node) = api_nodes
            .iter()
            .find(|n| n["metadata"]["name"] == name.as_str())
        else {
            return Ok(());
        };
        let labels = &api_node["metadata"]["labels"];
        let selects = |ds: &Value| {
            ds["spec"]["template"]["spec"]["nodeSelector"]
                .as_object()
                .is_none_or(|m| m.iter().all(|(k, v)| &labels[k] == v))
        };
        let on_node: Vec<&Value> = pods
            .iter()
            .filter(|p| p["spec"]["nodeName"] == name.as_str())
            .collect();
        // The DaemonSet controller: one pod per selected node; none elsewhere.
        for ds in dss {
            let ns = ds["metadata"]["namespace"].as_str().unwrap_or("");
            let ds_name = ds["metadata"]["name"].as_str().unwrap_or("");
            let mine: Vec<&&Value> = on_node
                .iter()
                .filter(|p| {
                    p["metadata"]["namespace"] == ns
                        && p["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
                        && p["metadata"]["ownerReferences"][0]["name"] == ds_name
                })
                .collect();
            if selects(ds) && mine.is_empty() {
                let labels = ds["spec"]["selector"]["matchLabels"].clone();
                self.api.add_daemon_pod(ns, ds_name, &name, labels, false);
            } else if !selects(ds) {
                for p in mine {
                    self.api.remove_object(
                        "pods",
                        ns,
                        p["metadata"]["name"].as_str().unwrap_or(""),
                    );
                }
            }
        }
        // Cilium's agent pod on this node.
        let backend = self.nodes[i].backend;
        let crash = self.nodes[i].faults.contains(&Fault::CiliumCrashloop);
        let cilium_pod = on_node.iter().find(|p| {
            p["metadata"]["namespace"] == self.cilium_ns.as_str()
                && p["metadata"]["ownerReferences"][0]["name"] == CILIUM_DS
                && p["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
        });
        let cilium_runs = backend == Backend::None
            && !restarting
            && now.duration_since(self.nodes[i].started_at) >= CILIUM_START;
        if let Some(p) = cilium_pod {
            let pname = p["metadata"]["name"].as_str().unwrap_or("").to_string();
            let ready = pod_ready(p);
            if cilium_runs && crash {
                *self.nodes[i].health_state.lock().expect("health") =
                    ("Failure".into(), "cilium-agent is restarting: failed to start: daemon creation failed (injected by the lab: cilium-crashloop)".into());
                self.start_health(i)?;
                if now.duration_since(self.nodes[i].last_crash) >= Duration::from_secs(1) || ready {
                    self.nodes[i].last_crash = now;
                    self.api.crashloop_pod(&self.cilium_ns.clone(), &pname);
                }
            } else if cilium_runs {
                if !ready {
                    self.api.clear_pod_waiting(&self.cilium_ns.clone(), &pname);
                    self.api
                        .set_pod_ready(&self.cilium_ns.clone(), &pname, true);
                }
                if !self.nodes[i].cilium_up {
                    *self.nodes[i].health_state.lock().expect("health") =
                        ("Ok".into(), String::new());
                    k3s::write_cilium_conflist(&root)?;
                    labnet::create_cilium_devices(&netns)?;
                    self.start_health(i)?;
                    self.nodes[i].cilium_up = true;
                } else if self.nodes[i].health_state.lock().expect("health").0 != "Ok" {
                    *self.nodes[i].health_state.lock().expect("health") =
                        ("Ok".into(), String::new());
                }
            } else if ready {
                self.api
                    .set_pod_ready(&self.cilium_ns.clone(), &pname, false);
            }
        }
        // The kubelet's Ready condition.
        let never = self.nodes[i].faults.contains(&Fault::NeverReady) && self.nodes[i].flags_none;
        if !restarting {
            if backend == Backend::Flannel || (k3s::has_cilium_conflist(&root) && !never) {
                self.api.set_node_condition(
                    &name,
                    true,
                    "KubeletReady",
                    "kubelet is posting ready status",
                );
            } else {
                self.api.set_node_condition(
                    &name,
                    false,
                    "KubeletNotReady",
                    "container runtime network not ready: cni config uninitialized",
                );
            }
        }
        let node_ready = !restarting
            && (backend == Backend::Flannel || (k3s::has_cilium_conflist(&root) && !never));
        // Pods: a veth on cni0 for each pod started under Flannel, a Cilium
        // endpoint for each started under Cilium; the kubelet readies them.
        let mut add = vec![];
        let mut seen = BTreeSet::new();
        for p in &on_node {
            if p["metadata"]["ownerReferences"][0]["name"] == CILIUM_DS {
                continue;
            }
            let uid = p["metadata"]["uid"].as_str().unwrap_or("").to_string();
            seen.insert(uid.clone());
            if !self.nodes[i].veths.contains_key(&uid) && !self.nodes[i].endpoints.contains(&uid) {
                if backend == Backend::Flannel {
                    let v = labnet::veth_name(&uid);
                    self.nodes[i].veths.insert(uid.clone(), v.clone());
                    add.push(v);
                } else if node_ready {
                    self.nodes[i].endpoints.insert(uid.clone());
                }
            }
            let started =
                self.nodes[i].veths.contains_key(&uid) || self.nodes[i].endpoints.contains(&uid);
            if node_ready
                && started
                && !pod_ready(p)
                && p["status"].get("containerStatuses").is_none()
            {
                let ns = p["metadata"]["namespace"].as_str().unwrap_or("");
                let pn = p["metadata"]["name"].as_str().unwrap_or("");
                self.api.set_pod_ready(ns, pn, true);
            }
        }
        let gone: Vec<String> = self.nodes[i]
            .veths
            .keys()
            .filter(|u| !seen.contains(*u))
            .cloned()
            .collect();
        let mut del = vec![];
        for u in gone {
            if let Some(v) = self.nodes[i].veths.remove(&u) {
                del.push(v);
            }
        }
        self.nodes[i].endpoints.retain(|u| seen.contains(u));
        let mut lines = labnet::add_pod_veths_lines(&add);
        lines.extend(labnet::del_pod_veths_lines(&del));
        labnet::batch("ip", Some(&netns), &lines)?;
        Ok(())
    }

    pub(super) fn tear_down_cilium(&mut self, i: usize) {
        k3s::remove_cilium_files(&self.nodes[i].rec.host_root);
        labnet::delete_cilium_devices(&self.nodes[i].rec.netns);
        self.stop_health(i);
        self.nodes[i].cilium_up = false;
    }
}

pub(super) fn pod_ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}
