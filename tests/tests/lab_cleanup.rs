//! `cnishift cleanup` across the lab: real coordinator, real agents over
//! mutual TLS, one node at a time, halting at the first refusal.

use cnishift_lab::cluster::{seed_nodes, Lab, LabOptions};
use cnishift_lab::require_root;

fn run(lab: &Lab, args: &[&str]) -> (i32, String) {
    let out = lab
        .coordinator()
        .arg("cleanup")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn cleanup_goes_node_by_node_and_halts_at_the_first_refusal() {
    if !require_root("lab network namespaces") {
        return;
    }
    let lab = Lab::up(&seed_nodes(), &LabOptions::default()).unwrap();
    let host = |node: &str, rel: &str| lab.dir.join("hosts").join(node).join(rel);

    // Dry run over the Flannel-era lab: every plan shown, every node refused.
    let (code, text) = run(&lab, &["--all"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("opi01: cleanup refused") && text.contains("k3s-flannel-backend"),
        "{text}"
    );
    assert!(
        text.contains("raccoon05: cleanup refused") && text.contains("flannel-conflist-wins"),
        "{text}"
    );
    assert!(
        text.find("opi03").unwrap() < text.find("raccoon00").unwrap(),
        "controllers first:\n{text}"
    );
    assert!(
        host("raccoon00", "run/flannel/subnet.env").exists(),
        "a dry run changes nothing"
    );

    // Cilium has taken over raccoon00: its k3s restarted without Flannel
    // (the containerd config k3s generates now names /etc/cni/net.d) and
    // Cilium's config is there.
    std::fs::write(
        host("raccoon00", "etc/cni/net.d/05-cilium.conflist"),
        r#"{"name":"cilium","plugins":[{"type":"cilium-cni"}]}"#,
    )
    .unwrap();
    let containerd = host(
        "raccoon00",
        "var/lib/rancher/k3s/agent/etc/containerd/config.toml",
    );
    std::fs::create_dir_all(containerd.parent().unwrap()).unwrap();
    std::fs::write(
        &containerd,
        "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dir = \"/opt/cni/bin\"\n  conf_dir = \"/etc/cni/net.d\"\n",
    )
    .unwrap();
    let (code, text) = run(&lab, &["raccoon00", "--apply"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("✓ path:/run/flannel"), "{text}");
    for rel in [
        "run/flannel",
        "var/lib/cni/networks/cbr0",
        "var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist",
        "var/lib/rancher/k3s/agent/etc/flannel/net-conf.json",
    ] {
        assert!(!host("raccoon00", rel).exists(), "{rel} is still there");
    }
    assert!(host("raccoon00", "etc/cni/net.d/05-cilium.conflist").exists());
    let backups = std::fs::read_dir(lab.dir.join("state/raccoon00/backup"))
        .unwrap()
        .count();
    assert_eq!(backups, 1, "the agent kept a backup");

    // --all --apply stops at the first controller; no later node is touched.
    let (code, text) = run(&lab, &["--all", "--apply"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("halting: opi01 refuses cleanup; 8 nodes not touched"),
        "{text}"
    );
    assert!(host("raccoon01", "run/flannel/subnet.env").exists());

    // Unknown node names are a usage error.
    let (code, text) = run(&lab, &["nosuchnode"]);
    assert_eq!(code, 2);
    assert!(text.contains("\"nosuchnode\" is not in"), "{text}");
}
