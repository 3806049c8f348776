//! Network interfaces, addresses and routes, read over rtnetlink: what of
//! Flannel is still plumbed in, has Cilium created its devices yet, and the
//! links with their MTUs and addresses (the coordinator's `values check`
//! needs them: the interface Cilium takes its MTU from, whether nodes share an
//! L2 subnet, Flannel's VXLAN port).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::RouteMessageBuilder;
use serde::{Deserialize, Serialize};

/// Interfaces Flannel (and k3s's kube-proxy IPVS mode) create.
pub const FLANNEL_INTERFACES: &[&str] = &[
    "flannel.1",
    "flannel-v6.1",
    "flannel-wg",
    "flannel-wg-v6",
    "cni0",
    "kube-ipvs0",
];
/// Interfaces the Cilium agent creates.
pub const CILIUM_INTERFACES: &[&str] = &["cilium_host", "cilium_net", "cilium_vxlan"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub index: u32,
    /// The rtnetlink kind (`vxlan`, `bridge`, `veth`, ...), when it has one.
    pub kind: Option<String>,
    /// Administratively up (IFF_UP).
    #[serde(default)]
    pub up: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NetworkFacts {
    /// Why the facts are empty, when they are (skipped or failed).
    pub not_probed: Option<String>,
    pub link_count: usize,
    /// Flannel's interfaces that exist, by name.
    pub flannel_interfaces: BTreeMap<String, Interface>,
    /// Interfaces enslaved to `cni0` (pod veths, one per pod on Flannel).
    pub cni0_members: Vec<String>,
    pub cilium_interfaces: BTreeMap<String, Interface>,
    /// Routes whose output device is a Flannel interface, as `dst dev`.
    pub flannel_routes: Vec<String>,
    /// Every link but the pod veths on `cni0`: name, MTU, addresses (`ADDR/LEN`),
    /// and a VXLAN device's UDP port. (New in the report: absent from older agents.)
    #[serde(default)]
    pub links: Vec<Link>,
    /// The link of the IPv4 default route, if there is one.
    #[serde(default)]
    pub default_route: Option<String>,
}

/// One link as the values check reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub name: String,
    pub index: u32,
    pub kind: Option<String>,
    pub mtu: Option<u32>,
    #[serde(default)]
    pub up: bool,
    /// `198.18.2.1/24`, `fe80::1/64`: the interface's own addresses with
    /// their prefix lengths (IFA_LOCAL where the kernel gives one).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// IFLA_VXLAN_PORT of a `vxlan` link (Flannel's is 8472 by default).
    #[serde(default)]
    pub vxlan_port: Option<u16>,
}

/// Dumps links and routes of the network namespace this process is in.
pub fn probe() -> NetworkFacts {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return NetworkFacts {
                not_probed: Some(format!("no async runtime: {e}")),
                ..Default::default()
            }
        }
    };
    match rt.block_on(dump()) {
        Ok((links, routes, addresses)) => {
            let mut f = from_messages(&links, &routes);
            add_links(&mut f, &links, &routes, &addresses);
            f
        }
        Err(e) => NetworkFacts {
            not_probed: Some(format!("rtnetlink dump failed: {e}")),
            ..Default::default()
        },
    }
}

type Dump = (Vec<LinkMessage>, Vec<RouteMessage>, Vec<AddressMessage>);

async fn dump() -> Result<Dump, String> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
    let task = tokio::spawn(conn);
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    let mut routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    // IPv6 may be disabled on the node: that is not a failure of the probe.
    if let Ok(v6) = handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect::<Vec<_>>()
        .await
    {
        routes.extend(v6);
    }
    let addresses: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    task.abort();
    Ok((links, routes, addresses))
}

/// Adds every link (but `cni0`'s pod veths) with its MTU, addresses and
/// VXLAN port, and the IPv4 default route's link (pure, tested without a kernel).
pub fn add_links(
    facts: &mut NetworkFacts,
    links: &[LinkMessage],
    routes: &[RouteMessage],
    addresses: &[AddressMessage],
) {
    let mut out: Vec<Link> = vec![];
    for msg in links {
        let mut l = Link {
            index: msg.header.index,
            up: msg
                .header
                .flags
                .contains(rtnetlink::packet_route::link::LinkFlags::Up),
            ..Default::default()
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::Mtu(m) => l.mtu = Some(*m),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => l.kind = Some(k.to_string()),
                            LinkInfo::Data(InfoData::Vxlan(v)) => {
                                l.vxlan_port = v.iter().find_map(|x| match x {
                                    InfoVxlan::Port(p) => Some(*p),
                                    _ => None,
                                })
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if l.name.is_empty() || facts.cni0_members.contains(&l.name) {
            continue;
        }
        out.push(l);
    }
    for a in addresses {
        let mut local = None;
        let mut address = None;
        for attr in &a.attributes {
            match attr {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        let Some(ip) = local.or(address) else {
            continue;
        };
        if let Some(l) = out.iter_mut().find(|l| l.index == a.header.index) {
            l.addresses.push(format!("{ip}/{}", a.header.prefix_len));
        }
    }
    facts.default_route = routes
        .iter()
        .filter(|r| {
            r.header.destination_prefix_length == 0
                && r.header.address_family == rtnetlink::packet_route::AddressFamily::Inet
                && r.header.table == 254
        })
        .find_map(|r| {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => {
                    out.iter().find(|l| l.index == *i).map(|l| l.name.clone())
                }
                _ => None,
            })
        });
    facts.links = out;
}

/// Turns raw netlink messages into facts (pure, so it is tested without a kernel).
pub fn from_messages(links: &[LinkMessage], routes: &[RouteMessage]) -> NetworkFacts {
    let mut facts = NetworkFacts {
        link_count: links.len(),
        ..Default::default()
    };
    let mut by_index: BTreeMap<u32, (String, Option<u32>, Option<String>)> = BTreeMap::new();
    let mut up: BTreeMap<u32, bool> = BTreeMap::new();
    for msg in links {
        let mut name = None;
        let mut master = None;
        let mut kind = None;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Controller(m) => master = Some(*m),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(name) = name {
            up.insert(
                msg.header.index,
                msg.header
                    .flags
                    .contains(rtnetlink::packet_route::link::LinkFlags::Up),
            );
            by_index.insert(msg.header.index, (name, master, kind));
        }
    }
    let cni0 = by_index
        .iter()
        .find(|(_, (n, _, _))| n == "cni0")
        .map(|(i, _)| *i);
    for (index, (name, master, kind)) in &by_index {
        let iface = Interface {
            index: *index,
            kind: kind.clone(),
            up: up.get(index).copied().unwrap_or(false),
        };
        if FLANNEL_INTERFACES.contains(&name.as_str()) {
            facts.flannel_interfaces.insert(name.clone(), iface.clone());
        }
        if CILIUM_INTERFACES.contains(&name.as_str()) {
            facts.cilium_interfaces.insert(name.clone(), iface);
        }
        if cni0.is_some() && *master == cni0 {
            facts.cni0_members.push(name.clone());
        }
    }
    let flannel_dev: BTreeMap<u32, &str> = facts
        .flannel_interfaces
        .iter()
        .filter(|(n, _)| n.starts_with("flannel"))
        .map(|(n, i)| (i.index, n.as_str()))
        .collect();
    for r in routes {
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let Some(dev) = oif.and_then(|i| flannel_dev.get(&i)) else {
            continue;
        };
        let dst = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(a.to_string()),
                RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(a.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| "default".into());
        facts.flannel_routes.push(format!(
            "{dst}/{} dev {dev}",
            r.header.destination_prefix_length
        ));
    }
    facts
}
