//! The nodes' real `cnishift-agent`s: started inside their namespaces, watched, stopped.

use super::*;

impl Lab {
    pub(super) fn node_index(&self, name: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.rec.name == name)
            .with_context(|| format!("{name} is not a node of this lab"))
    }

    pub(super) fn start_agent(&mut self, i: usize) -> Result<()> {
        let dir = self.rec.dir.clone();
        let n = &self.nodes[i];
        let pki = dir.join("pki");
        let name = n.rec.name.clone();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("logs").join(format!("{name}.log")))?;
        let netns = fs::File::open(Path::new("/run/netns").join(&n.rec.netns))?;
        let rollback = format!(
            "{} rollback --dir {} {{node}}",
            self.lab_bin.display(),
            dir.display()
        );
        let mut cmd = Command::new(&self.agent_bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("{}:{AGENT_PORT}", n.rec.address))
            .arg("--tls-ca")
            .arg(pki.join("ca.pem"))
            .arg("--tls-cert")
            .arg(pki.join(format!("{name}.pem")))
            .arg("--tls-key")
            .arg(pki.join(format!("{name}-key.pem")))
            .arg("--node-name")
            .arg(&name)
            .arg("--state-dir")
            .arg(dir.join("state").join(&name))
            .arg("--host-root")
            .arg(&n.rec.host_root)
            .env("RUST_LOG", "info")
            .env("CNISHIFT_ROLLBACK_COMMAND", rollback)
            .env(
                "CNISHIFT_ETCD_SNAPSHOT_COMMAND",
                crate::etcd::snapshot_command(&n.rec.host_root),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let fd = netns.as_raw_fd();
        // The agent lives in the node's namespace; `down` kills what is left
        // there (no parent-death signal: it is per thread, and agents are
        // restarted from short-lived control threads).
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the agent for {name}"))?;
        drop(netns);
        self.nodes[i].rec.agent_pid = Some(child.id());
        self.rec.nodes[i].agent_pid = Some(child.id());
        self.nodes[i].agent = Some(child);
        self.rec.save()?;
        Ok(())
    }

    pub(super) fn stop_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.nodes[i].rec.agent_pid = None;
        self.rec.nodes[i].agent_pid = None;
        let _ = self.rec.save();
    }

    pub(super) fn wait_agents(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        for i in 0..self.nodes.len() {
            let Some(pid) = self.nodes[i].agent.as_ref().map(Child::id) else {
                continue;
            };
            loop {
                if let Some(st) = self.nodes[i]
                    .agent
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    let name = &self.nodes[i].rec.name;
                    let log =
                        fs::read_to_string(self.rec.dir.join("logs").join(format!("{name}.log")))
                            .unwrap_or_default();
                    bail!("the agent of {name} exited ({st}) before listening:\n{log}");
                }
                if crate::netns::is_listening(pid, AGENT_PORT) {
                    break;
                }
                if start.elapsed() > limit {
                    bail!(
                        "the agent of {} is not listening after {limit:?}",
                        self.nodes[i].rec.name
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    pub(super) fn agent_state(&mut self, i: usize) -> String {
        match self.nodes[i].agent.as_mut() {
            None => "down".into(),
            Some(c) => match c.try_wait() {
                Ok(Some(st)) => format!("exited ({st})"),
                _ if crate::netns::is_listening(c.id(), AGENT_PORT) => "listening".into(),
                _ => "not listening".into(),
            },
        }
    }
}
