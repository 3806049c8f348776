//! Faults on a running lab: injected and cleared.

use super::*;

impl Lab {
    /// Cuts (or restores) the path between the admin box and node `i`: the
    /// node drops what it would send to the host-side address.
    pub(super) fn set_cut(&mut self, i: usize, cut: bool) -> Result<()> {
        if self.nodes[i].cut == cut {
            return Ok(());
        }
        let host = format!("{}/32", self.rec.host_address.context("no host address")?);
        let ns = self.nodes[i].rec.netns.clone();
        labnet::ip(&[
            "-n",
            &ns,
            "route",
            if cut { "add" } else { "del" },
            "blackhole",
            &host,
        ])?;
        self.nodes[i].cut = cut;
        Ok(())
    }

    pub(super) fn set_fault(&mut self, node: &str, fault: Fault, on: bool) -> Result<()> {
        let i = self.node_index(node)?;
        if fault == Fault::WorkerRestartsEarly && self.nodes[i].rec.role != Role::Worker {
            bail!("worker-restarts-early is for workers; {node} is a controller");
        }
        if matches!(fault, Fault::EtcdDown | Fault::EtcdSnapshotFails)
            && self.nodes[i].rec.role != Role::Controller
        {
            bail!("{fault} is for controllers (they run the etcd members); {node} is a worker");
        }
        if on {
            self.nodes[i].faults.insert(fault);
        } else {
            self.nodes[i].faults.remove(&fault);
        }
        match fault {
            Fault::AgentDown if on => self.stop_agent(i),
            Fault::AgentDown if self.nodes[i].agent.is_none() => {
                self.start_agent(i)?;
                self.wait_agents(Duration::from_secs(10))?;
            }
            Fault::Partition => self.set_cut(i, on)?,
            Fault::EtcdDown if on => self.stop_etcd(i),
            Fault::EtcdDown => {
                self.start_etcd(i)?;
                self.wait_etcd(etcd::ETCD_READY)?;
            }
            Fault::EtcdSnapshotFails => self.spoil_snapshots(i, on)?,
            Fault::Unconfirmed if !on => self.set_cut(i, false)?,
            Fault::SlowApi => self.api.faults().set_delay(if on {
                self.api_deadline + Duration::from_secs(1)
            } else {
                Duration::ZERO
            }),
            Fault::PdbBlocks => {
                let ns = "lab-faults";
                let name = format!("blocked-on-{node}");
                if on {
                    let labels = json!({"app.kubernetes.io/name": name});
                    self.api
                        .add_deployment(ns, &name, labels.clone(), 1, &[node]);
                    self.api.add_pdb(ns, &name, labels, Some(1), None);
                } else {
                    self.api.remove_object("poddisruptionbudgets", ns, &name);
                }
            }
            Fault::SoleReplica => {
                let vol = self.sole_replica_volume(node)?;
                if on {
                    self.api
                        .longhorn_sole_replica(&vol, node)
                        .map_err(anyhow::Error::msg)?;
                } else {
                    self.api.longhorn_rebuilt(&vol);
                }
            }
            Fault::OtherSubnet => {
                let other = format!("192.0.2.{}", i + 1);
                let ns = self.nodes[i].rec.netns.clone();
                let verb = if on { "add" } else { "del" };
                let r = labnet::ip(&[
                    "-n",
                    &ns,
                    "addr",
                    verb,
                    &format!("{other}/24"),
                    "dev",
                    "eth0",
                ]);
                if on {
                    r?;
                }
                let ip = if on {
                    other
                } else {
                    self.nodes[i].rec.address.to_string()
                };
                self.api.set_node_internal_ip(node, &ip);
            }
            _ => {}
        }
        Ok(())
    }

    /// The Longhorn volume `sole-replica` acts on for `node`: postgres's when
    /// it has a replica there, else vaultwarden's.
    fn sole_replica_volume(&self, node: &str) -> Result<String> {
        for (ns, claim) in [
            ("database", "data-postgres-0"),
            ("vaultwarden", "vaultwarden-data"),
        ] {
            if let Some(v) = self.api.longhorn_volume_of(ns, claim) {
                let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
                let on_node = self.api.list("replicas.longhorn.io").iter().any(|r| {
                    r["spec"]["volumeName"] == name.as_str() && r["spec"]["nodeID"] == node
                });
                if on_node {
                    return Ok(name);
                }
            }
        }
        bail!("no seed Longhorn volume has a replica on {node}")
    }
}
