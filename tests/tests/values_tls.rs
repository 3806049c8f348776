//! `k8sServiceHost` is this cluster's API server: the real agent dials it
//! (`DialFromNode`, a real TLS handshake on loopback) and the coordinator
//! verifies the peer's chain against the kubeconfig's CA for that name —
//! passing for the right server, failing for a server of another CA or a
//! name its certificate does not hold.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cnishift::agents::ClientTls;
use cnishift::certs;
use cnishift::inventory::{Inventory, Load};
use cnishift::kube::gates::Verdict;
use cnishift::kube::Kube;
use cnishift::values;
use cnishift_lab::loopback::{Agent, Pki};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS server on loopback presenting `stem`.pem of `dir` (handshakes only).
async fn tls_server(dir: &Path, stem: &str) -> u16 {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join(format!("{stem}.pem")))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{stem}-key.pem"))).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let a = acceptor.clone();
            tokio::spawn(async move {
                let _ = a.accept(s).await;
            });
        }
    });
    port
}

fn kube_with_ca(port: u16, ca_pem: &Path) -> Kube {
    let mut c = kube::Config::new(format!("https://127.0.0.1:{port}").parse().unwrap());
    c.root_cert = Some(
        CertificateDer::pem_file_iter(ca_pem)
            .unwrap()
            .map(|c| c.unwrap().to_vec())
            .collect(),
    );
    c.connect_timeout = Some(Duration::from_secs(1));
    Kube::from_config(c, Duration::from_secs(1)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_host_is_verified_against_the_kubeconfig_ca_from_the_node() {
    let pki = Pki::new(&["n1"]).unwrap();
    let agent = Agent::start(pki.dir.path(), "n1", "n1", &[]).unwrap();
    // The cluster's API server: its own CA, a certificate for 127.0.0.1.
    let api_pki = tempfile::tempdir().unwrap();
    certs::init_ca(api_pki.path(), 30, false).unwrap();
    certs::issue_to_dir(
        api_pki.path(),
        "apiserver",
        &certs::Spec::for_days(
            vec!["kubernetes".into()],
            vec!["127.0.0.1".parse().unwrap()],
            30,
        ),
        false,
    )
    .unwrap();
    let port = tls_server(api_pki.path(), "apiserver").await;
    let dir = tempfile::tempdir().unwrap();
    let inv_path = dir.path().join("cluster.toml");
    std::fs::write(
        &inv_path,
        format!(
            "[tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/coordinator.pem\"\nkey = \"{p}/coordinator-key.pem\"\n\
             [deadlines]\nconnect = \"1s\"\nreport = \"3s\"\napi = \"1s\"\n\
             [[nodes]]\nname = \"n1\"\nrole = \"worker\"\naddress = \"{}\"\n",
            agent.address(),
            p = pki.dir.path().display()
        ),
    )
    .unwrap();
    let inv = Inventory::load(
        &inv_path,
        Load {
            require_tls_files: true,
        },
    )
    .unwrap();
    let tls = ClientTls::load(&inv.tls).unwrap();
    let host_finding = |host: &str, kube: Kube| {
        let file = dir.path().join(format!("{host}.yaml"));
        std::fs::write(
            &file,
            format!("k8sServiceHost: \"{host}\"\nk8sServicePort: {port}\n"),
        )
        .unwrap();
        let (inv, tls) = (&inv, &tls);
        async move {
            let r = values::check(&file, &kube, inv, tls).await.unwrap();
            r.findings
                .into_iter()
                .find(|f| f.key == "k8sServiceHost")
                .unwrap()
        }
    };

    let right = host_finding(
        "127.0.0.1",
        kube_with_ca(port, &api_pki.path().join("ca.pem")),
    )
    .await;
    assert_eq!(right.verdict, Verdict::Pass, "{right:#?}");
    assert!(
        right.observed.contains(
            "its certificate verifies against the kubeconfig's CA for 127.0.0.1 from every node"
        ),
        "{}",
        right.observed
    );

    // A kubeconfig that trusts another CA (of the same name, as two cnishift
    // CAs are): what answers is not its API server.
    let other = host_finding("127.0.0.1", kube_with_ca(port, &pki.path("ca.pem"))).await;
    assert_eq!(other.verdict, Verdict::Fail, "{other:#?}");
    assert!(
        other
            .observed
            .contains("from n1: invalid peer certificate: BadSignature"),
        "{}",
        other.observed
    );

    // A name the certificate does not hold (the VIP missing from --tls-san).
    let name = host_finding(
        "localhost",
        kube_with_ca(port, &api_pki.path().join("ca.pem")),
    )
    .await;
    assert_eq!(name.verdict, Verdict::Fail, "{name:#?}");
    assert!(
        name.observed
            .contains("certificate not valid for name \"localhost\"")
            && name.observed.contains("for kubernetes, 127.0.0.1"),
        "{}",
        name.observed
    );
    assert!(name.fix.unwrap().contains("--tls-san localhost"));
}
