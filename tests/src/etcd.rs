//! The lab's etcd: real members (Debian's `etcd-server`, etcd 3.4), one per
//! controller namespace, laid out as k3s lays out its embedded etcd — client
//! URL `https://127.0.0.1:2379` inside the node's namespace, peer URL on the
//! node's address, mutual TLS for clients and peers with the certificates at
//! k3s's paths under the node's host root (`var/lib/rancher/k3s/server/tls/etcd`),
//! data at k3s's data directory under it. So the agent on a lab controller
//! asks the very files and address it asks on a real k3s server.
//!
//! The certificates are made here with rcgen, in k3s's shape: a server CA
//! that signs `server-client.crt` (the member serves with it and may call
//! with it) and `client.crt` (the API server's client certificate), a peer
//! CA that signs `peer-server-client.crt`.

use std::fs;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// k3s's etcd certificates, under a host root.
pub const TLS_DIR: &str = "var/lib/rancher/k3s/server/tls/etcd";
/// k3s's etcd data directory, under a host root.
pub const DATA_DIR: &str = "var/lib/rancher/k3s/server/db/etcd";
/// Where `k3s etcd-snapshot save` writes, under a host root.
pub const SNAPSHOT_DIR: &str = "var/lib/rancher/k3s/server/db/snapshots";
pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;
/// Raft timing for the lab: every member is one bridge hop from the others,
/// so a leader is elected within a few hundred milliseconds of the members
/// starting (etcd's defaults, 100 ms and 1 s, are for real networks and would
/// cost every lab test a second); still ten heartbeats per election timeout,
/// as etcd's tuning guide asks.
pub const HEARTBEAT_MS: u32 = 25;
pub const ELECTION_MS: u32 = 250;

/// `etcd` or `etcdctl` on PATH, or an error that says how to get it.
pub fn tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "`{name}` is not on PATH: the lab's controllers run real etcd members \
         (`apt-get install etcd-server etcd-client`)"
    )
}

/// True when etcd and etcdctl are installed; a loud SKIPPED line otherwise,
/// and under CI=true a failure.
pub fn require_etcd(what: &str) -> bool {
    match (tool("etcd"), tool("etcdctl")) {
        (Ok(_), Ok(_)) => true,
        (Err(e), _) | (_, Err(e)) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but {e}: {what} must run in CI"
            );
            eprintln!("SKIPPED (no etcd): {what}: {e}");
            false
        }
    }
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<()> {
    fs::create_dir_all(path.parent().expect("has a parent"))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut f, contents.as_bytes())?;
    Ok(())
}

fn ca(cn: &str) -> Result<(Issuer<'static, KeyPair>, String, String)> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p);
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    Ok((Issuer::new(p, key), cert_pem, key_pem))
}

fn validity(p: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(30);
}

/// A leaf: (certificate PEM, key PEM).
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    dns: &[&str],
    ips: &[IpAddr],
    usages: &[ExtendedKeyUsagePurpose],
) -> Result<(String, String)> {
    let mut p = CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())?;
    p.subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = usages.to_vec();
    validity(&mut p);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// One etcd cluster's certificate authorities.
pub struct Pki {
    server: (Issuer<'static, KeyPair>, String, String),
    peer: (Issuer<'static, KeyPair>, String, String),
}

impl Pki {
    pub fn new() -> Result<Pki> {
        Ok(Pki {
            server: ca("etcd-server-ca")?,
            peer: ca("etcd-peer-ca")?,
        })
    }

    /// Writes k3s's etcd files for member `name` (reachable by peers at `ip`)
    /// into `tls_dir`.
    pub fn write_member(&self, tls_dir: &Path, name: &str, ip: IpAddr) -> Result<()> {
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let loopback: IpAddr = "127.0.0.1".parse().expect("an address");
        let (issuer, ca_pem, ca_key) = &self.server;
        write(&tls_dir.join("server-ca.crt"), ca_pem, 0o644)?;
        write(&tls_dir.join("server-ca.key"), ca_key, 0o600)?;
        let (c, k) = leaf(
            issuer,
            "etcd-server",
            &["localhost", name],
            &[loopback, ip],
            &[ServerAuth, ClientAuth],
        )?;
        write(&tls_dir.join("server-client.crt"), &c, 0o644)?;
        write(&tls_dir.join("server-client.key"), &k, 0o600)?;
        let (c, k) = leaf(issuer, "etcd-client", &[], &[], &[ClientAuth])?;
        write(&tls_dir.join("client.crt"), &c, 0o644)?;
        write(&tls_dir.join("client.key"), &k, 0o600)?;
        let (issuer, ca_pem, ca_key) = &self.peer;
        write(&tls_dir.join("peer-ca.crt"), ca_pem, 0o644)?;
        write(&tls_dir.join("peer-ca.key"), ca_key, 0o600)?;
        let (c, k) = leaf(
            issuer,
            "etcd-peer",
            &["localhost", name],
            &[loopback, ip],
            &[ServerAuth, ClientAuth],
        )?;
        write(&tls_dir.join("peer-server-client.crt"), &c, 0o644)?;
        write(&tls_dir.join("peer-server-client.key"), &k, 0o600)?;
        Ok(())
    }
}

/// A client certificate no etcd of the lab trusts (its own self-signed CA):
/// (certificate PEM, key PEM).
pub fn stranger() -> Result<(String, String)> {
    let (issuer, _, _) = ca("not the etcd CA")?;
    leaf(
        &issuer,
        "stranger",
        &[],
        &[],
        &[ExtendedKeyUsagePurpose::ClientAuth],
    )
}

/// `name=https://ip:2380,...` for `--initial-cluster`.
pub fn initial_cluster(members: &[(String, IpAddr)]) -> String {
    members
        .iter()
        .map(|(n, ip)| format!("{n}=https://{ip}:{PEER_PORT}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One member to start.
pub struct Member<'a> {
    pub name: &'a str,
    /// The network namespace (under /run/netns) it runs in; None: this one.
    pub netns: Option<&'a str>,
    /// Where its peers reach it.
    pub peer_ip: IpAddr,
    /// Its certificates (as [`Pki::write_member`] wrote them).
    pub tls_dir: &'a Path,
    pub data_dir: &'a Path,
    /// `--initial-cluster` (ignored by etcd once the data directory exists).
    pub cluster: &'a str,
    pub token: &'a str,
    pub log: &'a Path,
}

/// A command that runs `program` inside `netns` (via setns before exec, so
/// the process is the program itself and shows in `ip netns pids`).
pub fn command_in(netns: Option<&str>, program: &Path) -> Result<Command> {
    let mut cmd = Command::new(program);
    if let Some(ns) = netns {
        let f = fs::File::open(Path::new("/run/netns").join(ns))
            .with_context(|| format!("network namespace {ns}"))?;
        // SAFETY: only async-signal-safe calls between fork and exec; the
        // file stays open in the closure until exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    Ok(cmd)
}

/// Starts a member; it runs until killed.
pub fn spawn(m: &Member) -> Result<Child> {
    let etcd = tool("etcd")?;
    let t = |f: &str| m.tls_dir.join(f);
    let fresh = !m.data_dir.join("member").exists();
    fs::create_dir_all(m.data_dir)?;
    // etcd refuses a data directory others can read.
    fs::set_permissions(
        m.data_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(m.log)
        .with_context(|| format!("{}", m.log.display()))?;
    let mut cmd = command_in(m.netns, &etcd)?;
    cmd.arg("--name")
        .arg(m.name)
        .arg("--data-dir")
        .arg(m.data_dir)
        .arg(format!(
            "--listen-client-urls=https://127.0.0.1:{CLIENT_PORT}"
        ))
        .arg(format!(
            "--advertise-client-urls=https://127.0.0.1:{CLIENT_PORT}"
        ))
        .arg(format!(
            "--listen-peer-urls=https://{}:{PEER_PORT}",
            m.peer_ip
        ))
        .arg(format!(
            "--initial-advertise-peer-urls=https://{}:{PEER_PORT}",
            m.peer_ip
        ))
        .arg(format!("--initial-cluster={}", m.cluster))
        .arg(format!(
            "--initial-cluster-state={}",
            if fresh { "new" } else { "existing" }
        ))
        .arg(format!("--initial-cluster-token={}", m.token))
        .arg("--client-cert-auth")
        .arg("--trusted-ca-file")
        .arg(t("server-ca.crt"))
        .arg("--cert-file")
        .arg(t("server-client.crt"))
        .arg("--key-file")
        .arg(t("server-client.key"))
        .arg("--peer-client-cert-auth")
        .arg("--peer-trusted-ca-file")
        .arg(t("peer-ca.crt"))
        .arg("--peer-cert-file")
        .arg(t("peer-server-client.crt"))
        .arg("--peer-key-file")
        .arg(t("peer-server-client.key"))
        .arg(format!("--heartbeat-interval={HEARTBEAT_MS}"))
        .arg(format!("--election-timeout={ELECTION_MS}"))
        .args(["--logger=zap", "--log-outputs=stderr", "--log-level=info"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    cmd.spawn()
        .with_context(|| format!("starting the etcd member {}", m.name))
}

/// `etcdctl` against the member in `netns`, with the certificates in
/// `tls_dir` (server-client.crt, as k3s's own etcd client would).
pub fn etcdctl(netns: Option<&str>, tls_dir: &Path, args: &[&str]) -> Result<Command> {
    let mut cmd = command_in(netns, &tool("etcdctl")?)?;
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=https://127.0.0.1:{CLIENT_PORT}"))
        .arg("--cacert")
        .arg(tls_dir.join("server-ca.crt"))
        .arg("--cert")
        .arg(tls_dir.join("server-client.crt"))
        .arg("--key")
        .arg(tls_dir.join("server-client.key"))
        .args(args)
        .stdin(Stdio::null());
    Ok(cmd)
}

/// `etcdctl endpoint health` once: Ok, or its words.
pub fn health(netns: Option<&str>, tls_dir: &Path) -> Result<(), String> {
    let out = etcdctl(
        netns,
        tls_dir,
        &["--command-timeout=1s", "endpoint", "health"],
    )
    .map_err(|e| e.to_string())?
    .output()
    .map_err(|e| format!("running etcdctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Waits until every member (netns, tls_dir, child) is healthy — which
/// means a leader was elected and it has a quorum — within `limit`. A member
/// that exits is an error with its log.
pub fn wait_healthy(
    members: &mut [(&str, Option<&str>, &Path, &mut Child, &Path)],
    limit: Duration,
) -> Result<()> {
    let start = Instant::now();
    for (name, netns, tls, child, log) in members.iter_mut() {
        loop {
            if let Some(st) = child.try_wait()? {
                bail!(
                    "the etcd member {name} exited ({st}):\n{}",
                    fs::read_to_string(&**log).unwrap_or_default()
                );
            }
            let listening = crate::netns::is_listening(child.id(), CLIENT_PORT);
            let err = if listening {
                match health(*netns, tls) {
                    Ok(()) => break,
                    Err(e) => e,
                }
            } else {
                "not listening yet".into()
            };
            if start.elapsed() > limit {
                bail!(
                    "the etcd member {name} is not healthy after {limit:?}: {err}\n{}",
                    fs::read_to_string(&**log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// The command template the lab's agents take a snapshot with: `etcdctl
/// snapshot save` into the node's snapshot directory, named as k3s names
/// its snapshots (`<name>-<node>-<unix seconds>`, name `cnishift-pre-<run>`).
pub fn snapshot_command(host_root: &Path) -> String {
    let tls = host_root.join(TLS_DIR);
    let snaps = host_root.join(SNAPSHOT_DIR);
    format!(
        "sh -c 'exec etcdctl --endpoints=https://127.0.0.1:{CLIENT_PORT} --cacert=\"$0/server-ca.crt\" \
         --cert=\"$0/server-client.crt\" --key=\"$0/server-client.key\" snapshot save \
         \"$1/cnishift-pre-$2-$3-$(date +%s)\"' {} {} {{run}} {{node}}",
        shlex::try_quote(&tls.display().to_string()).expect("no NUL in a path"),
        shlex::try_quote(&snaps.display().to_string()).expect("no NUL in a path"),
    )
}
