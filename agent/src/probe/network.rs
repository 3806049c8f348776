//! Network interfaces and routes, read over rtnetlink: what of Flannel is
//! still plumbed in, and has Cilium created its devices yet?

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkInfo, LinkMessage};
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
        Ok((links, routes)) => from_messages(&links, &routes),
        Err(e) => NetworkFacts {
            not_probed: Some(format!("rtnetlink dump failed: {e}")),
            ..Default::default()
        },
    }
}

async fn dump() -> Result<(Vec<LinkMessage>, Vec<RouteMessage>), String> {
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
    task.abort();
    Ok((links, routes))
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
