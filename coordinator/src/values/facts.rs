//! The facts the values rules judge against, gathered at once: the nodes as
//! the Kubernetes API registers them (InternalIP, podCIDR), every agent's
//! report (its links with MTUs and addresses, whether its k3s runs Flannel,
//! what containerd reads, the kernel and eBPF verdicts), and a dial from
//! every node to `k8sServiceHost:k8sServicePort` whose peer certificate is
//! verified here against the kubeconfig's CA.
//!
//! Gathering never fails as a whole: what could not be learned is recorded
//! as an error beside the node, and the rules that need it say so.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use cnishift_proto::v1 as pb;
use k8s_openapi::api::core::v1::{ConfigMap, Node as KubeNode};
use kube::api::{Api, ListParams};
use serde::{Deserialize, Serialize};

use crate::agents::{self, ClientTls};
use crate::inventory::Inventory;
use crate::kube::gates::Verdict;
use crate::kube::Kube;

/// One link of a node, as its agent reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub name: String,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub up: bool,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub vxlan_port: Option<u16>,
}

/// Whether the node's running k3s uses Flannel (the agent's `k3s.network` verdict).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum Flannel {
    Running(String),
    NotRunning(String),
    Unknown(String),
}

/// What one agent said.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentFacts {
    pub links: Vec<Link>,
    pub default_route: Option<String>,
    pub flannel: Option<Flannel>,
    /// k3s's generated containerd config: the CNI directories it reads now.
    pub containerd_conf_dir: Option<String>,
    pub containerd_bin_dir: Option<String>,
    /// k3s's own CNI directory (Flannel's conflist lives there).
    pub k3s_cni_dir: Option<String>,
    /// Every check the agent judged: id → (verdict, message).
    pub checks: BTreeMap<String, (Verdict, String)>,
}

/// A dial from a node to the API endpoint the values name.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Dial {
    pub ok: bool,
    pub address: String,
    pub elapsed_us: u64,
    pub error: String,
    pub peer_subject: String,
    pub peer_sans: Vec<String>,
    pub tls_version: String,
    /// The peer chain checked against the kubeconfig's CA with the server
    /// name `k8sServiceHost`: None when no TLS was asked or no CA is known.
    pub verified: Option<Result<(), String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeFacts {
    pub name: String,
    /// Registered in the API (a node of the inventory may not be).
    pub in_api: bool,
    pub internal_ip: Option<IpAddr>,
    pub pod_cidrs: Vec<String>,
    pub agent: Result<AgentFacts, String>,
    pub dial: Option<Result<Dial, String>>,
}

/// The API server as the kubeconfig names it.
#[derive(Debug, Clone, Serialize)]
pub struct ApiServer {
    pub url: String,
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// The kubeconfig names a CA (the DER certificates, not shown).
    #[serde(skip)]
    pub ca: Vec<Vec<u8>>,
    pub insecure: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    pub nodes: Vec<NodeFacts>,
    pub pod_cidr: Option<String>,
    pub service_cidr: Option<String>,
    pub node_label: Option<(String, String)>,
    pub api_vip: Option<SocketAddr>,
    pub api: ApiServer,
    /// kube-public/cluster-info exists (asked only for `k8sServiceHost: auto`).
    pub cluster_info: Option<Result<bool, String>>,
    /// Listing the nodes failed.
    pub api_error: Option<String>,
}

impl Facts {
    pub fn node(&self, name: &str) -> Option<&NodeFacts> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

fn verdict(v: i32) -> Verdict {
    match pb::Verdict::try_from(v).unwrap_or(pb::Verdict::Unspecified) {
        pb::Verdict::Pass => Verdict::Pass,
        pb::Verdict::Fail => Verdict::Fail,
        _ => Verdict::Warn,
    }
}

/// The facts of one agent report (judged against Expectation::Cilium, so the
/// `k3s.network` verdict reads: fail = k3s still runs Flannel).
pub fn agent_facts(r: &pb::NodeReport) -> AgentFacts {
    let facts: serde_json::Value = serde_json::from_str(&r.facts_json).unwrap_or_default();
    let net = &facts["network"];
    let links: Vec<Link> = serde_json::from_value(net["links"].clone()).unwrap_or_default();
    let s = |v: &serde_json::Value| v.as_str().map(String::from);
    let checks: BTreeMap<String, (Verdict, String)> = r
        .checks
        .iter()
        .map(|c| (c.id.clone(), (verdict(c.verdict), c.message.clone())))
        .collect();
    let flannel = checks.get("k3s.network").map(|(v, m)| match v {
        Verdict::Fail => Flannel::Running(m.clone()),
        Verdict::Pass => Flannel::NotRunning(m.clone()),
        Verdict::Warn => Flannel::Unknown(m.clone()),
    });
    AgentFacts {
        links,
        default_route: s(&net["default_route"]),
        flannel,
        containerd_conf_dir: s(&facts["cni"]["containerd"]["conf_dir"]),
        containerd_bin_dir: s(&facts["cni"]["containerd"]["bin_dir"]),
        k3s_cni_dir: s(&facts["cni"]["k3s"]["path"]),
        checks,
    }
}

/// Verifies a peer chain (DER, leaf first) against `ca` for `server_name`,
/// as a client of this cluster's API server would.
pub fn verify_chain(chain: &[Vec<u8>], ca: &[Vec<u8>], server_name: &str) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let Some((leaf, rest)) = chain.split_first() else {
        return Err("the server presented no certificate".into());
    };
    let mut roots = rustls::RootCertStore::empty();
    for der in ca {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| format!("the kubeconfig's CA is not a usable certificate: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("cannot build a verifier from the kubeconfig's CA: {e}"))?;
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("{server_name:?} is not a server name: {e}"))?;
    let intermediates: Vec<CertificateDer> = rest
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    verifier
        .verify_server_cert(
            &CertificateDer::from(leaf.clone()),
            &intermediates,
            &name,
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The kubeconfig's API server.
pub fn api_server(kube: &Kube) -> ApiServer {
    let c = &kube.config;
    let uri = &c.cluster_url;
    let https = uri.scheme_str() != Some("http");
    let mut ca = c.root_cert.clone().unwrap_or_default();
    if ca.is_empty() {
        if let Some(p) = &c.root_cert_file {
            if let Ok(pem) = std::fs::read(p) {
                ca = pem_certs(&pem);
            }
        }
    }
    ApiServer {
        url: uri.to_string(),
        https,
        host: uri
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
        ca,
        insecure: c.accept_invalid_certs,
    }
}

/// The DER certificates of a PEM bundle.
fn pem_certs(pem: &[u8]) -> Vec<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect()
}

/// Gathers every fact at once. `endpoint` is `k8sServiceHost:k8sServicePort`
/// when the values set both (dialled from every node).
pub async fn gather(
    kube: &Kube,
    inv: &Inventory,
    tls: &ClientTls,
    endpoint: Option<(&str, u16)>,
) -> Facts {
    let api = api_server(kube);
    let nodes_api: Api<KubeNode> = Api::all(kube.client.clone());
    let lp = ListParams::default();
    let list = kube.call("list nodes", nodes_api.list(&lp));
    let cluster_info = async {
        if endpoint.map(|(h, _)| h) != Some("auto") {
            return None;
        }
        let cms: Api<ConfigMap> = Api::namespaced(kube.client.clone(), "kube-public");
        Some(
            kube.call(
                "get ConfigMap kube-public/cluster-info",
                cms.get_opt("cluster-info"),
            )
            .await
            .map(|c| c.is_some())
            .map_err(|e| e.to_string()),
        )
    };
    let d = &inv.deadlines;
    let per_node = futures::future::join_all(inv.nodes.iter().map(|n| async move {
        let report = agents::get_report_expecting(n, tls, d, pb::Expectation::Cilium);
        let dial = async {
            let (host, port) = endpoint?;
            if host == "auto" {
                return None;
            }
            let address = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let req = pb::DialRequest {
                address,
                tls: api.https,
                server_name: host.to_string(),
                timeout_ms: d.connect.as_millis().clamp(100, 30_000) as u64,
            };
            Some(agents::dial_from_node(n, tls, d, req).await)
        };
        let (report, dial) = tokio::join!(report, dial);
        (report, dial)
    }));
    let (list, cluster_info, per_node) = tokio::join!(list, cluster_info, per_node);
    let (api_nodes, api_error) = match list {
        Ok(l) => (l.items, None),
        Err(e) => (vec![], Some(e.to_string())),
    };
    let nodes = inv
        .nodes
        .iter()
        .zip(per_node)
        .map(|(n, (report, dial))| {
            let k = api_nodes
                .iter()
                .find(|k| k.metadata.name.as_deref() == Some(n.name.as_str()));
            let internal_ip = k
                .and_then(|k| k.status.as_ref())
                .and_then(|s| s.addresses.as_ref())
                .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
                .and_then(|a| a.address.parse().ok());
            let pod_cidrs = k
                .and_then(|k| k.spec.as_ref())
                .map(|s| match (&s.pod_cidrs, &s.pod_cidr) {
                    (Some(l), _) if !l.is_empty() => l.clone(),
                    (_, Some(c)) => vec![c.clone()],
                    _ => vec![],
                })
                .unwrap_or_default();
            let dial = dial.map(|r| {
                r.map(|d| {
                    let verified = (d.ok && api.https && !api.ca.is_empty()).then(|| {
                        verify_chain(
                            &d.peer_chain_der,
                            &api.ca,
                            endpoint.map(|(h, _)| h).unwrap_or(""),
                        )
                    });
                    Dial {
                        ok: d.ok,
                        address: d.address,
                        elapsed_us: d.elapsed_us,
                        error: d.error,
                        peer_subject: d.peer_subject,
                        peer_sans: d.peer_sans,
                        tls_version: d.tls_version,
                        verified,
                    }
                })
                .map_err(|e| e.to_string())
            });
            NodeFacts {
                name: n.name.clone(),
                in_api: k.is_some(),
                internal_ip,
                pod_cidrs,
                agent: report.map(|r| agent_facts(&r)).map_err(|e| e.to_string()),
                dial,
            }
        })
        .collect();
    Facts {
        nodes,
        pod_cidr: inv.cluster.pod_cidr.clone(),
        service_cidr: inv.cluster.service_cidr.clone(),
        node_label: inv.cilium.node_label.clone(),
        api_vip: inv.cluster.api_vip,
        api,
        cluster_info,
        api_error,
    }
}
