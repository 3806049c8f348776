//! Budgets of the Kubernetes operations, against the simulated API server over
//! real loopback HTTP (in-process server, kube-rs client):
//!
//! - drain of a node with 50 pods (no PodDisruptionBudget pressure) with
//!   evictions in parallel (budget ≤ 2 s), against one at a time;
//! - how long after the lab sets a node Ready the watch-based wait returns
//!   (budget ≤ 100 ms), and the same for the Cilium agent pod.
//!
//! Run: `cargo bench -p cnishift-lab --bench kube_ops`

use std::time::{Duration, Instant};

use cnishift::inventory::DrainPolicy;
use cnishift::kube::Kube;
use cnishift_lab::apiserver::ApiServer;
use serde_json::json;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn drain_once(parallel: usize, latency: Duration) -> Duration {
    let api = ApiServer::new();
    for n in ["n1", "n2", "n3", "n4"] {
        api.add_node(n, n == "n1", true);
    }
    for d in 0..10 {
        let name = format!("app{d}");
        api.add_deployment("work", &name, json!({"app": name}), 5, &["n1"]);
        // A budget that allows every disruption: arithmetic runs, no pressure.
        api.add_pdb(
            "work",
            &format!("{name}-pdb"),
            json!({"app": name}),
            None,
            Some(5),
        );
    }
    assert_eq!(api.pods_on("n1").len(), 50);
    let addr = api.start().await;
    let kube = Kube::for_url(&format!("http://{addr}"), Duration::from_secs(5)).unwrap();
    kube.cordon("n1").await.unwrap();
    api.faults().set_delay(latency);
    let policy = DrainPolicy {
        parallel_evictions: parallel,
        ..DrainPolicy::default()
    };
    let started = Instant::now();
    let report = kube
        .drain("n1", &policy, Duration::from_secs(60), &|_| {})
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(report.evicted.len(), 50);
    assert!(api.pods_on("n1").is_empty());
    took
}

/// Time from the lab flipping readiness to the wait returning.
async fn ready_latency(cilium: bool) -> Duration {
    let api = ApiServer::new();
    api.add_node("n1", false, !cilium);
    if cilium {
        api.add_daemonset_with_pods(
            "cilium",
            "cilium",
            json!({"k8s-app": "cilium"}),
            &["n1"],
            false,
        );
    } else {
        api.set_node_ready("n1", false);
    }
    let addr = api.start().await;
    let kube = Kube::for_url(&format!("http://{addr}"), Duration::from_secs(5)).unwrap();
    let k = kube.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let r = if cilium {
            k.wait_cilium_ready("n1", "cilium", Duration::from_secs(10))
                .await
        } else {
            k.wait_node_ready("n1", Duration::from_secs(10)).await
        };
        let _ = tx.send((Instant::now(), r));
    });
    // Until the waiter has listed and opened its watch.
    let path = if cilium {
        "/api/v1/namespaces/cilium/pods"
    } else {
        "/api/v1/nodes"
    };
    while api.faults().requests_matching("GET", path) < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let set = Instant::now();
    if cilium {
        let pod = api.daemon_pod_on("cilium", "cilium", "n1").unwrap();
        api.set_pod_ready("cilium", &pod, true);
    } else {
        api.set_node_ready("n1", true);
    }
    let (done, r) = rx.await.unwrap();
    r.unwrap();
    done - set
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let runs = 11;
        // The simulator answers at once; a k3s server on a Pi takes milliseconds
        // per request, so the drain is also measured with 5 ms added to each answer.
        for latency in [Duration::ZERO, Duration::from_millis(5)] {
            let mut parallel = vec![];
            let mut sequential = vec![];
            for _ in 0..runs {
                parallel.push(drain_once(8, latency).await);
                sequential.push(drain_once(1, latency).await);
            }
            let (p, s) = (median(parallel.clone()), median(sequential));
            println!(
                "drain 50 pods, +{} ms per request, 8 evictions in flight: median {:.1} ms (max {:.1} ms) over {runs} runs; budget 2000 ms -> {:.3}x",
                latency.as_millis(),
                ms(p),
                ms(*parallel.iter().max().unwrap()),
                ms(p) / 2000.0
            );
            println!(
                "drain 50 pods, +{} ms per request, one eviction at a time: median {:.1} ms -> parallel/sequential {:.2}",
                latency.as_millis(),
                ms(s),
                ms(p) / ms(s)
            );
        }
        for (what, cilium) in [("node Ready", false), ("Cilium agent pod Ready", true)] {
            let mut v = vec![];
            for _ in 0..51 {
                v.push(ready_latency(cilium).await);
            }
            let max = *v.iter().max().unwrap();
            let med = median(v);
            println!(
                "{what} noticed after the lab set it: median {:.2} ms, max {:.2} ms over 51 trials; budget 100 ms -> {:.3}x",
                ms(med),
                ms(max),
                ms(med) / 100.0
            );
        }
    });
}
