//! The network of `cnishift-lab up`: a bridge in a namespace of its own, one
//! namespace per node cabled to it, and one lab-owned link from this
//! machine's namespace into the bridge, so the admin box's `cnishift` and
//! `kubectl` reach the nodes and the API server. Each lab gets its own /24 in
//! 198.18.0.0/15 (RFC 2544, benchmarking): the host gets that subnet's route
//! (the kernel's, from the address) and nothing else — no iptables, no sysctl.
//! Inside each node: Flannel's `flannel.1` (VXLAN over the bridge) with a
//! route, neighbour and FDB entry per peer, `cni0` with pod veths, and the
//! `FLANNEL-*` chains.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// Names of lab-owned namespaces and host links start with this.
pub const PREFIX: &str = "cnshl";
pub const HOST_SUFFIX: u8 = 254;

pub fn ip(args: &[&str]) -> Result<Output> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `cmd -batch -` (ip or bridge) with `lines`, optionally in `netns`.
pub fn batch(tool: &str, netns: Option<&str>, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut c = Command::new(tool);
    if let Some(ns) = netns {
        c.args(["-n", ns]);
    }
    let mut child = c
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(lines.join("\n").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{tool} -batch in {}: {}",
            netns.unwrap_or("the host"),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The lab's /24: 198.18.0.0/15 holds 512 of them.
pub fn subnet_base(index: u16) -> [u8; 3] {
    [198, 18 + (index / 256) as u8, (index % 256) as u8]
}

pub fn address(index: u16, host: u8) -> Ipv4Addr {
    let [a, b, c] = subnet_base(index);
    Ipv4Addr::new(a, b, c, host)
}

pub fn bridge_ns(index: u16) -> String {
    format!("{PREFIX}{index}-br")
}
pub fn node_ns(index: u16, i: usize) -> String {
    format!("{PREFIX}{index}-n{i}")
}
pub fn host_link(index: u16) -> String {
    format!("{PREFIX}{index}")
}
/// The bridge-side end of node `i`'s cable (down = the node cut off).
pub fn bridge_port(i: usize) -> String {
    format!("n{i}")
}

/// Creates the bridge namespace and the host link with its address.
pub fn create_bridge(index: u16) -> Result<()> {
    let br = bridge_ns(index);
    ip(&["netns", "add", &br])?;
    let link = host_link(index);
    let host_addr = format!("{}/24", address(index, HOST_SUFFIX));
    batch(
        "ip",
        Some(&br),
        &[
            "link add br0 type bridge".into(),
            "link set br0 up".into(),
            "link set lo up".into(),
        ],
    )?;
    // The host end stays here; its peer goes into the bridge namespace.
    ip(&[
        "link", "add", &link, "type", "veth", "peer", "name", "uplink", "netns", &br,
    ])?;
    batch("ip", Some(&br), &["link set uplink master br0 up".into()])?;
    ip(&["addr", "add", &host_addr, "dev", &link])?;
    ip(&["link", "set", &link, "up"])?;
    Ok(())
}

/// Creates node `i`'s namespace with `eth0` cabled to the bridge.
pub fn create_node(index: u16, i: usize) -> Result<Ipv4Addr> {
    let ns = node_ns(index, i);
    let addr = address(index, (i + 1) as u8);
    ip(&["netns", "add", &ns])?;
    let port = bridge_port(i);
    ip(&[
        "-n",
        &bridge_ns(index),
        "link",
        "add",
        &port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &ns,
    ])?;
    batch(
        "ip",
        Some(&bridge_ns(index)),
        &[format!("link set {port} master br0 up")],
    )?;
    batch(
        "ip",
        Some(&ns),
        &[
            format!("addr add {addr}/24 dev eth0"),
            "link set eth0 up".into(),
            "link set lo up".into(),
        ],
    )?;
    Ok(addr)
}

/// Cuts (or restores) node `i`'s cable at the bridge.
pub fn set_node_link(index: u16, i: usize, up: bool) -> Result<()> {
    ip(&[
        "-n",
        &bridge_ns(index),
        "link",
        "set",
        &bridge_port(i),
        if up { "up" } else { "down" },
    ])?;
    Ok(())
}

/// One node's Flannel as the seed runs it.
pub struct Flannel<'a> {
    pub netns: &'a str,
    pub address: Ipv4Addr,
    /// This node's pod subnet's network address (10.42.N.0) and prefix.
    pub subnet: Ipv4Addr,
    pub prefix: u8,
    pub pod_cidr: &'a str,
    /// (subnet network address, node address) of every other node.
    pub peers: Vec<(Ipv4Addr, Ipv4Addr)>,
}

/// flannel.1's MAC on the node with `address`, as its peers' FDBs know it.
pub fn vtep_mac(address: Ipv4Addr) -> String {
    let o = address.octets();
    format!("0a:fa:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

fn gateway(subnet: Ipv4Addr) -> Ipv4Addr {
    let mut o = subnet.octets();
    o[3] |= 1;
    Ipv4Addr::from(o)
}

/// flannel.1, its routes/neighbours/FDB to every peer, cni0, and the
/// FLANNEL-* iptables chains, in `f.netns`.
pub fn create_flannel(f: &Flannel) -> Result<()> {
    let mut lines = vec![
        format!(
            "link add flannel.1 address {} type vxlan id 1 local {} dev eth0 dstport 8472 nolearning",
            vtep_mac(f.address),
            f.address
        ),
        format!("addr add {}/32 dev flannel.1", f.subnet),
        "link set flannel.1 mtu 1450 up".into(),
        "link add cni0 type bridge".into(),
        format!("addr add {}/{} dev cni0", gateway(f.subnet), f.prefix),
        "link set cni0 mtu 1450 up".into(),
    ];
    let mut fdb = vec![];
    for (subnet, node) in &f.peers {
        lines.push(format!(
            "route add {subnet}/{} via {subnet} dev flannel.1 onlink",
            f.prefix
        ));
        lines.push(format!(
            "neigh add {subnet} lladdr {} dev flannel.1 nud permanent",
            vtep_mac(*node)
        ));
        fdb.push(format!(
            "fdb append {} dev flannel.1 dst {node}",
            vtep_mac(*node)
        ));
    }
    batch("ip", Some(f.netns), &lines)?;
    batch("bridge", Some(f.netns), &fdb)?;
    let rules = format!(
        "*filter\n:FLANNEL-FWD - [0:0]\n-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
         -A FLANNEL-FWD -s {cidr} -m comment --comment \"flanneld forward\" -j ACCEPT\n\
         -A FLANNEL-FWD -d {cidr} -m comment --comment \"flanneld forward\" -j ACCEPT\nCOMMIT\n\
         *nat\n:FLANNEL-POSTRTG - [0:0]\n-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
         -A FLANNEL-POSTRTG -s {cidr} -d {cidr} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s {cidr} -d {cidr} -m comment --comment \"flanneld masq\" -j RETURN\nCOMMIT\n",
        cidr = f.pod_cidr
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", f.netns, "iptables-restore", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running iptables-restore")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore in {}: {}",
            f.netns,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A pod's veth: the host end on cni0 (`veth<id>`), the pod end beside it.
pub fn veth_name(pod_uid: &str) -> String {
    let h = pod_uid.bytes().fold(0x811c_9dc5u32, |a, b| {
        (a ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("veth{h:08x}")
}

pub fn add_pod_veths_lines(names: &[String]) -> Vec<String> {
    names
        .iter()
        .flat_map(|v| {
            let peer = v.replacen("veth", "pod", 1);
            [
                format!("link add {v} type veth peer name {peer}"),
                format!("link set {v} master cni0 up"),
                format!("link set {peer} up"),
            ]
        })
        .collect()
}

pub fn del_pod_veths_lines(names: &[String]) -> Vec<String> {
    names.iter().map(|v| format!("link del {v}")).collect()
}

/// Cilium's host devices: the `cilium_host`/`cilium_net` veth pair, up.
pub fn create_cilium_devices(netns: &str) -> Result<()> {
    batch(
        "ip",
        Some(netns),
        &[
            "link add cilium_host type veth peer name cilium_net".into(),
            "link set cilium_net up".into(),
            "link set cilium_host up".into(),
        ],
    )
}

pub fn delete_cilium_devices(netns: &str) {
    let _ = ip(&["-n", netns, "link", "del", "cilium_host"]);
}

/// Every lab-owned namespace and host link on this machine (by name).
pub fn owned_names() -> (Vec<String>, Vec<String>) {
    let ns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default();
    let links: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default();
    (ns, links)
}
