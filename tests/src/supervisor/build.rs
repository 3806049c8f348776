//! Building a lab: subnet, namespaces, PKI (the real `cnishift certs`), host roots,
//! Flannel devices, bpffs mounts, the API server, cluster.toml and kubeconfig; then the
//! agents, the loop and the control socket.

use super::*;

pub(super) fn build(spec: UpSpec, mut rec: Record) -> Result<()> {
    let dir = spec.dir.clone();
    let inv = read_inventory(&spec.inventory)?;
    let named = spec
        .faults
        .iter()
        .map(|(n, _)| n)
        .chain(spec.kernel_configs.iter().map(|(n, _)| n));
    for n in named {
        if !inv.nodes.iter().any(|(m, _)| m == n) {
            bail!("{n} is not a node of {}", spec.inventory.display());
        }
    }
    let lab_bin = std::env::current_exe()?;
    let agent_bin = binary("cnishift-agent", "CNISHIFT_AGENT_BIN")?;
    let cnishift_bin = binary("cnishift", "CNISHIFT_BIN")?;
    let subnet = record::claim_subnet(&dir)?;
    rec.subnet = subnet;
    rec.host_link = Some(labnet::host_link(subnet));
    rec.host_address = Some(labnet::address(subnet, labnet::HOST_SUFFIX));
    rec.namespaces.push(labnet::bridge_ns(subnet));
    for i in 0..inv.nodes.len() {
        rec.namespaces.push(labnet::node_ns(subnet, i));
    }
    let host_addr = labnet::address(subnet, labnet::HOST_SUFFIX);
    let api_addr = SocketAddr::from((host_addr, API_PORT));
    rec.api = Some(api_addr);
    rec.save()?;
    fs::create_dir_all(dir.join("logs"))?;

    // Network: bridge, host link, one namespace per node.
    labnet::create_bridge(subnet)?;
    let mut nodes_rec = vec![];
    for (i, (name, role)) in inv.nodes.iter().enumerate() {
        let address = labnet::create_node(subnet, i)?;
        let net = node_subnet(&inv.pod_cidr, i)?;
        nodes_rec.push(NodeRecord {
            name: name.clone(),
            role: *role,
            netns: labnet::node_ns(subnet, i),
            address,
            pod_cidr: format!("{net}/24"),
            host_root: dir.join("hosts").join(name),
            agent_pid: None,
            etcd_pid: None,
        });
    }
    rec.nodes = nodes_rec.clone();
    rec.save()?;

    // PKI with the real `cnishift certs`.
    let pki = dir.join("pki");
    let certs = |args: &[&str]| -> Result<()> {
        let out = Command::new(&cnishift_bin)
            .arg("certs")
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "cnishift certs {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let pki_s = pki.to_str().context("utf-8 dir")?;
    certs(&["init", "--dir", pki_s, "--days", "30"])?;
    certs(&[
        "issue",
        "--dir",
        pki_s,
        "--coordinator",
        "--ip",
        &host_addr.to_string(),
        "--days",
        "30",
    ])?;

    // Host roots, kernel configs, Flannel devices: per node, in parallel.
    let mut notes = vec![];
    let mut configs: BTreeMap<String, (Vec<u8>, String)> = BTreeMap::new();
    for (name, role) in &inv.nodes {
        let over = spec.kernel_configs.iter().find(|(n, _)| n == name);
        let (cfg, note) = match over {
            Some((_, file)) => (
                fs::read(file)
                    .with_context(|| format!("--kernel-config {name}:{}", file.display()))?,
                format!("{} (--kernel-config)", file.display()),
            ),
            None => {
                let (cfg, changed) = hostroot::fixed_fixture(*role)?;
                let n = if changed.is_empty() {
                    format!("{} fixture", hostroot::fixture_name(*role))
                } else {
                    format!(
                        "{} fixture with {} (the fix preflight suggests)",
                        hostroot::fixture_name(*role),
                        changed.join(", ")
                    )
                };
                (cfg, n)
            }
        };
        configs.insert(name.clone(), (cfg, note));
    }
    {
        let mut by_note: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (n, (_, note)) in &configs {
            by_note.entry(note.clone()).or_default().push(n.clone());
        }
        for (note, ns) in by_note {
            notes.push(format!("kernel config of {}: {note}", ns.join(", ")));
        }
        notes.push("--kernel-config NODE:FILE puts another config on a node".into());
    }
    let peers: Vec<(Ipv4Addr, Ipv4Addr)> = nodes_rec
        .iter()
        .map(|n| {
            (
                n.pod_cidr
                    .split('/')
                    .next()
                    .unwrap_or("")
                    .parse()
                    .unwrap_or(Ipv4Addr::UNSPECIFIED),
                n.address,
            )
        })
        .collect();
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes_rec
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let configs = &configs;
                let inv = &inv;
                let peers = &peers;
                let cnishift_bin = &cnishift_bin;
                s.spawn(move || -> Result<()> {
                    let out = Command::new(cnishift_bin)
                        .args([
                            "certs",
                            "issue",
                            "--dir",
                            pki_s,
                            "--node",
                            &n.name,
                            "--ip",
                            &n.address.to_string(),
                            "--days",
                            "30",
                        ])
                        .output()?;
                    if !out.status.success() {
                        bail!(
                            "cnishift certs issue --node {}: {}",
                            n.name,
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                    let subnet = peers[i].0;
                    hostroot::build_node(
                        &n.host_root,
                        &n.name,
                        n.role,
                        &NodeFiles {
                            pod_cidr: inv.pod_cidr.clone(),
                            pod_subnet: format!("{}/24", Ipv4Addr::from(u32::from(subnet) | 1)),
                            kernel_config: Some(configs[&n.name].0.clone()),
                        },
                    )?;
                    k3s::write_flags(&n.host_root, n.role, false)?;
                    k3s::write_containerd_config(&n.host_root, Backend::Flannel)?;
                    labnet::create_flannel(&labnet::Flannel {
                        netns: &n.netns,
                        address: n.address,
                        subnet,
                        prefix: 24,
                        pod_cidr: &inv.pod_cidr,
                        peers: peers
                            .iter()
                            .enumerate()
                            .filter(|(j, _)| *j != i)
                            .map(|(_, p)| *p)
                            .collect(),
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("setup thread"))
            .collect()
    });
    for r in results {
        r?;
    }
    let etcd_cluster = etcd::prepare(&nodes_rec)?;
    // bpffs where a real node has it, so the agent's bpf checks see one.
    for n in &nodes_rec {
        let target = n.host_root.join("sys/fs/bpf");
        rec.mounts.push(target.clone());
        rec.save()?;
        let t = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())?;
        // SAFETY: mount(2) with valid C strings.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                t.as_ptr(),
                c"bpf".as_ptr(),
                0,
                c"mode=700".as_ptr().cast(),
            )
        };
        if rc != 0 {
            bail!(
                "mounting bpffs on {}: {}",
                target.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    rec.notes = notes;
    rec.save()?;

    // The API server with the same nodes and a seed-like workload.
    let api = ApiServer::new();
    for n in &nodes_rec {
        api.add_lab_node(&LabNode {
            name: &n.name,
            controller: n.role == Role::Controller,
            pod_cidr: &n.pod_cidr,
            address: n.address,
            kernel: hostroot::release(n.role),
        });
    }
    let pairs: Vec<(&str, bool)> = nodes_rec
        .iter()
        .map(|n| (n.name.as_str(), n.role == Role::Controller))
        .collect();
    api.add_seed_workload(&pairs, &inv.cilium_ns, inv.cilium_selector.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(api_addr))
        .with_context(|| format!("listening on {api_addr}"))?;
    rt.spawn(api.clone().serve(listener));
    fs::write(dir.join("kubeconfig"), kubeconfig(api_addr))?;
    write_cluster_toml(&dir, &inv, &nodes_rec, &lab_bin, api_addr)?;

    let mut lab = Lab {
        rec,
        api,
        nodes: nodes_rec
            .iter()
            .map(|r| Node {
                rec: r.clone(),
                flags_none: false,
                backend: Backend::Flannel,
                restart_until: None,
                started_at: now_s(),
                cilium_up: false,
                health: None,
                health_state: Arc::new(Mutex::new(("Ok".into(), String::new()))),
                veths: BTreeMap::new(),
                endpoints: BTreeSet::new(),
                faults: BTreeSet::new(),
                agent: None,
                etcd: None,
                last_crash: now_s(),
                lease_at: now_s(),
                cut: false,
            })
            .collect(),
        cilium_ns: inv.cilium_ns.clone(),
        rt: rt.handle().clone(),
        agent_bin,
        lab_bin,
        api_deadline: inv.api_deadline,
        etcd_cluster,
        etcd_token: format!("cnishift-lab-{}", subnet),
    };
    // The members first: their election runs while the agents start.
    let etcd_started = Instant::now();
    for i in 0..lab.nodes.len() {
        if lab.nodes[i].rec.role == Role::Controller {
            lab.start_etcd(i)?;
        }
    }
    for (node, fault) in &spec.faults {
        lab.set_fault(node, *fault, true)?;
    }
    for i in 0..lab.nodes.len() {
        if !lab.nodes[i].faults.contains(&Fault::AgentDown) {
            lab.start_agent(i)?;
        }
    }
    lab.wait_agents(Duration::from_secs(20))?;
    let agents_ready = etcd_started.elapsed();
    lab.wait_etcd(etcd::ETCD_READY)?;
    let members: Vec<String> = lab
        .nodes
        .iter()
        .filter(|n| n.etcd.is_some())
        .map(|n| n.rec.name.clone())
        .collect();
    if !members.is_empty() {
        let healthy = etcd_started.elapsed();
        lab.rec.notes.push(format!(
            "etcd: {} healthy {} ms after the members started (the agents listened at {} ms; etcdctl against k3s's paths: logs/NODE.etcd.log)",
            members.join(", "),
            healthy.as_millis(),
            agents_ready.as_millis()
        ));
    }
    // Pods get their veths, DaemonSets their pods, before `up` returns.
    lab.tick();
    // The control socket listens before `up` is told the lab is ready, so
    // a `deploy` or `fault` right after `up` returns finds it.
    let sock = dir.join("control.sock");
    let _ = fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    lab.rec.ready = true;
    lab.rec.save()?;
    let lab = Arc::new(Mutex::new(lab));
    {
        let lab = lab.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(TICK);
            lab.lock().expect("lab").tick();
        });
    }
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let lab = lab.clone();
        std::thread::spawn(move || {
            let _ = serve_control(&lab, conn);
        });
    }
    drop(rt);
    Ok(())
}

fn write_cluster_toml(
    dir: &Path,
    inv: &InventoryIn,
    nodes: &[NodeRecord],
    lab_bin: &Path,
    api: SocketAddr,
) -> Result<()> {
    let mut t = inv.table.clone();
    let abs = |p: &str| dir.join(p).display().to_string();
    let mut tls = toml::Table::new();
    tls.insert("ca".into(), abs("pki/ca.pem").into());
    tls.insert("cert".into(), abs("pki/coordinator.pem").into());
    tls.insert("key".into(), abs("pki/coordinator-key.pem").into());
    t.insert("tls".into(), tls.into());
    let cluster = t
        .entry("cluster")
        .or_insert_with(|| toml::Table::new().into())
        .as_table_mut()
        .context("[cluster] is not a table")?;
    cluster.insert("api_vip".into(), api.to_string().into());
    cluster
        .entry("cilium_namespace")
        .or_insert_with(|| inv.cilium_ns.clone().into());
    let hooks = t
        .entry("hooks")
        .or_insert_with(|| toml::Table::new().into())
        .as_table_mut()
        .context("[hooks] is not a table")?;
    // The lab's own deploy and rollback (what `just nix deploy` and its
    // reverse do to a real node). The inventory's verify and cilium_install
    // hooks name tools a lab node has not got (the `cilium` CLI): dropped.
    let lab_hook = |verb: &str| -> toml::Value {
        [
            lab_bin.display().to_string(),
            verb.into(),
            "--dir".into(),
            dir.display().to_string(),
            "{node}".into(),
        ]
        .into_iter()
        .map(toml::Value::from)
        .collect::<Vec<_>>()
        .into()
    };
    hooks.insert("deploy".into(), lab_hook("deploy"));
    hooks.insert("rollback".into(), lab_hook("rollback"));
    hooks.remove("verify");
    hooks.remove("cilium_install");
    if let Some(arr) = t.get_mut("nodes").and_then(|n| n.as_array_mut()) {
        for (entry, n) in arr.iter_mut().zip(nodes) {
            if let Some(e) = entry.as_table_mut() {
                e.insert(
                    "address".into(),
                    format!("{}:{AGENT_PORT}", n.address).into(),
                );
            }
        }
    }
    let text = format!(
        "# Written by cnishift-lab up from {} with the lab's agent addresses, TLS files, API server and deploy/rollback hooks (the inventory's verify and cilium_install hooks dropped: a lab node has no cilium CLI).\n{}",
        inv.path.display(),
        toml::to_string(&t)?
    );
    fs::write(dir.join("cluster.toml"), text)?;
    Ok(())
}
