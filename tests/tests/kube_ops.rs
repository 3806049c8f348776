//! The coordinator's Kubernetes operations (kube-rs) against the lab's
//! simulated API server over real HTTP: drains with Deployment, DaemonSet,
//! mirror and emptyDir pods and PodDisruptionBudgets, cordon memory, waits
//! by watch (also across a cut watch), the Lease lock, Events, the cluster
//! gates, and faults (server down, slow, 500s, 409s).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cnishift::inventory::DrainPolicy;
use cnishift::kube::drain::{DrainError, DrainEvent};
use cnishift::kube::events::{Kind, Step};
use cnishift::kube::gates::Verdict;
use cnishift::kube::lease::{LockError, LockOptions};
use cnishift::kube::nodes::{Uncordoned, PRIOR_ANNOTATION};
use cnishift::kube::{Kube, KubeError};
use cnishift_lab::apiserver::{ApiServer, Owner, Pod};
use serde_json::json;

async fn lab(nodes: &[&str]) -> (ApiServer, std::net::SocketAddr, Kube) {
    let api = ApiServer::new();
    for (i, n) in nodes.iter().enumerate() {
        api.add_node(n, i == 0, true);
    }
    let addr = api.start().await;
    let kube = Kube::for_url(&format!("http://{addr}"), Duration::from_secs(2)).unwrap();
    (api, addr, kube)
}

fn names_on(api: &ApiServer, node: &str) -> Vec<String> {
    let mut v: Vec<String> = api
        .pods_on(node)
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["metadata"]["namespace"].as_str().unwrap(),
                p["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    v.sort();
    v
}

fn quiet(_: DrainEvent) {}

fn fast_policy() -> DrainPolicy {
    DrainPolicy {
        retry_interval: Duration::from_millis(100),
        ..DrainPolicy::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_evicts_deployment_pods_and_leaves_daemonset_and_mirror_pods() {
    let (api, _, kube) = lab(&["n1", "n2", "n3"]).await;
    let web = api.add_deployment("shop", "web", json!({"app": "web"}), 2, &["n1"]);
    api.add_daemonset_with_pods(
        "monitoring",
        "node-exporter",
        json!({"app": "ne"}),
        &["n1", "n2", "n3"],
        true,
    );
    api.add_pod(Pod {
        ns: "kube-system",
        name: "etcd-n1",
        node: "n1",
        owner: Owner::Mirror,
        labels: json!({}),
        ready: true,
        empty_dir: false,
    });
    api.add_replicaset("shop", "cache-5c9", json!({"app": "cache"}));
    api.add_pod(Pod {
        ns: "shop",
        name: "cache-5c9-x1",
        node: "n1",
        owner: Owner::ReplicaSet("cache-5c9"),
        labels: json!({"app": "cache"}),
        ready: true,
        empty_dir: true,
    });
    let before = names_on(&api, "n1");
    assert_eq!(before.len(), 5, "{before:?}");

    // The emptyDir pod is refused by default, before anything is evicted.
    let err = kube
        .drain("n1", &fast_policy(), Duration::from_secs(5), &quiet)
        .await
        .unwrap_err();
    match &err {
        KubeError::Drain(DrainError::Refused { pods, .. }) => {
            assert_eq!(pods.len(), 1, "{pods:?}");
            assert_eq!(pods[0].0, "shop/cache-5c9-x1");
            assert!(pods[0].1.contains("allow_local_storage"), "{}", pods[0].1);
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert_eq!(
        names_on(&api, "n1"),
        before,
        "a refused drain must not evict anything"
    );

    kube.cordon("n1").await.unwrap();
    let policy = DrainPolicy {
        allow_local_storage: true,
        ..fast_policy()
    };
    let report = kube
        .drain("n1", &policy, Duration::from_secs(5), &quiet)
        .await
        .unwrap();
    let mut evicted = report.evicted.clone();
    evicted.sort();
    let mut expected: Vec<String> = web.iter().map(|p| format!("shop/{p}")).collect();
    expected.push("shop/cache-5c9-x1".into());
    expected.sort();
    assert_eq!(evicted, expected);
    let left = names_on(&api, "n1");
    assert_eq!(
        left.len(),
        2,
        "only the DaemonSet and mirror pods stay: {left:?}"
    );
    assert!(left.iter().any(|p| p == "kube-system/etcd-n1"));
    assert!(left
        .iter()
        .any(|p| p.starts_with("monitoring/node-exporter-")));
    assert_eq!(report.skipped.len(), 2);
    // The ReplicaSet replaced the evicted pods on the other, schedulable nodes.
    let elsewhere: Vec<String> = names_on(&api, "n2")
        .into_iter()
        .chain(names_on(&api, "n3"))
        .filter(|p| p.starts_with("shop/"))
        .collect();
    assert_eq!(elsewhere.len(), 3, "{elsewhere:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_that_never_allows_fails_at_the_deadline_naming_pod_and_budget_without_hidden_retries(
) {
    let (api, _, kube) = lab(&["n1", "n2"]).await;
    let pods = api.add_deployment("shop", "db", json!({"app": "db"}), 1, &["n1"]);
    api.add_pdb("shop", "db-pdb", json!({"app": "db"}), None, Some(0));
    let blocked = Arc::new(Mutex::new(0usize));
    let b2 = blocked.clone();
    let progress = move |e: DrainEvent| {
        if let DrainEvent::Blocked(_) = e {
            *b2.lock().unwrap() += 1;
        }
    };
    let started = Instant::now();
    let err = kube
        .drain("n1", &fast_policy(), Duration::from_secs(1), &progress)
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1800),
        "bounded by the 1 s deadline: {took:?}"
    );
    let text = err.to_string();
    assert!(text.contains(&format!("pod shop/{}", pods[0])), "{text}");
    assert!(text.contains("PodDisruptionBudget shop/db-pdb"), "{text}");
    assert!(text.contains("needs 1 healthy pods and has 1"), "{text}");
    let posts = api.faults().requests_matching("POST", "/eviction");
    let ours = *blocked.lock().unwrap();
    assert!(
        posts >= 5,
        "asked again about every 100 ms over 1 s: {posts}"
    );
    assert_eq!(
        posts, ours,
        "every POST the server saw is one of our loop's: no retry layer underneath"
    );
    assert_eq!(api.pods_on("n1").len(), 1, "the pod is still there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_that_allows_once_the_replacement_is_ready_lets_the_drain_finish() {
    let (api, _, kube) = lab(&["n1", "n2"]).await;
    api.add_deployment("shop", "api", json!({"app": "api"}), 2, &["n1"]);
    api.add_pdb("shop", "api-pdb", json!({"app": "api"}), Some(1), None);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let progress = move |e: DrainEvent| {
        if let DrainEvent::Blocked(b) = e {
            let _ = tx.send(b);
        }
    };
    let lab_api = api.clone();
    let kubelet = tokio::spawn(async move {
        // The second eviction waits on the budget until the first replacement is Ready.
        let b = rx.recv().await.expect("a blocked eviction");
        assert_eq!(b.pdb.as_deref(), Some("shop/api-pdb"));
        for p in lab_api.pods_on("n2") {
            lab_api.set_pod_ready("shop", p["metadata"]["name"].as_str().unwrap(), true);
        }
    });
    let report = kube
        .drain("n1", &fast_policy(), Duration::from_secs(5), &progress)
        .await
        .unwrap();
    kubelet.await.unwrap();
    assert_eq!(report.evicted.len(), 2);
    assert!(api.pods_on("n1").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordon_remembers_an_admins_cordon_and_survives_a_resumed_run() {
    let (api, _, kube) = lab(&["n1", "n2", "n3"]).await;
    let unschedulable = |n: &str| api.node(n).unwrap()["spec"]["unschedulable"] == json!(true);
    let annotation =
        |n: &str| api.node(n).unwrap()["metadata"]["annotations"][PRIOR_ANNOTATION].clone();

    let c = kube.cordon("n1").await.unwrap();
    assert!(!c.was_cordoned && c.changed);
    assert!(unschedulable("n1"));
    // A resumed run cordons again: it must not take its own cordon for the admin's.
    let again = kube.cordon("n1").await.unwrap();
    assert!(!again.was_cordoned && !again.changed);
    assert_eq!(kube.uncordon("n1").await.unwrap(), Uncordoned::Uncordoned);
    assert!(!unschedulable("n1"));
    assert!(annotation("n1").is_null(), "memory removed");

    // An admin cordoned n2 before the migration.
    kube.cordon("n2").await.unwrap();
    kube.uncordon("n2").await.unwrap();
    let client = kube.client.clone();
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    nodes
        .patch(
            "n2",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    let c = kube.cordon("n2").await.unwrap();
    assert!(c.was_cordoned);
    assert_eq!(
        kube.uncordon("n2").await.unwrap(),
        Uncordoned::LeftCordonedByAdmin
    );
    assert!(unschedulable("n2"), "the admin's cordon stays");
    assert!(annotation("n2").is_null());

    assert_eq!(kube.uncordon("n3").await.unwrap(), Uncordoned::NotOurs);
    assert!(kube
        .cordon("nope")
        .await
        .unwrap_err()
        .to_string()
        .contains("404"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_resumes_after_a_cut_watch_and_times_out_with_the_reason() {
    let (api, _, kube) = lab(&["n1"]).await;
    api.set_node_ready("n1", false);
    let err = kube
        .wait_node_ready("n1", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, KubeError::WaitTimedOut { .. }), "{err}");
    assert!(err.to_string().contains("NotReady"), "{err}");

    let k = kube.clone();
    let waiter = tokio::spawn(async move { k.wait_node_ready("n1", Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gets_before = api.faults().requests_matching("GET", "/api/v1/nodes");
    api.faults().cut_watches();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "a cut watch is not Ready");
    assert!(
        api.faults().requests_matching("GET", "/api/v1/nodes") > gets_before,
        "the watch was opened again"
    );
    // Resumed from the last resourceVersion it had seen: a watch, not a new list.
    let log = api.faults().request_log();
    let node_gets: Vec<&String> = log
        .iter()
        .filter(|(m, p)| m == "GET" && p.starts_with("/api/v1/nodes?"))
        .map(|(_, p)| p)
        .collect();
    let last = node_gets.last().unwrap();
    let rv = api.node("n1").unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        last.contains("watch=true") && last.contains(&format!("resourceVersion={rv}")),
        "{node_gets:#?}"
    );
    let lists = node_gets
        .iter()
        .filter(|p| !p.contains("watch=true"))
        .count();
    assert_eq!(
        lists, 2,
        "one list per wait (the timed-out one and this one): {node_gets:#?}"
    );
    let set = Instant::now();
    api.set_node_ready("n1", true);
    waiter.await.unwrap().unwrap();
    assert!(set.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_cilium_watches_the_daemonsets_pod_on_that_node() {
    let (api, _, kube) = lab(&["n1", "n2"]).await;
    api.add_daemonset_with_pods(
        "cilium",
        "cilium",
        json!({"k8s-app": "cilium"}),
        &["n1", "n2"],
        false,
    );
    let err = kube
        .wait_cilium_ready("n1", "kube-system", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no pod of DaemonSet kube-system/cilium"),
        "{err}"
    );
    let err = kube
        .wait_cilium_ready("n1", "cilium", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not Ready"), "{err}");

    let k = kube.clone();
    let waiter = tokio::spawn(async move {
        k.wait_cilium_ready("n1", "cilium", Duration::from_secs(5))
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // n2's agent turning Ready is not n1's.
    api.set_pod_ready(
        "cilium",
        &api.daemon_pod_on("cilium", "cilium", "n2").unwrap(),
        true,
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished());
    api.set_pod_ready(
        "cilium",
        &api.daemon_pod_on("cilium", "cilium", "n1").unwrap(),
        true,
    );
    waiter.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_give_bounded_waits_and_clear_errors() {
    // Down: nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = Kube::for_url(&format!("http://{closed}"), Duration::from_secs(2)).unwrap();
    let started = Instant::now();
    let err = down.cordon("n1").await.unwrap_err();
    assert!(matches!(err, KubeError::Unreachable { .. }), "{err}");
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
    let err = down
        .wait_node_ready("n1", Duration::from_millis(700))
        .await
        .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("refused"),
        "the last error is in the timeout: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let (api, _, _) = lab(&["n1", "n2"]).await;
    let addr = api.start().await;
    let kube = Kube::for_url(&format!("http://{addr}"), Duration::from_millis(300)).unwrap();
    // Slow: every answer after the deadline.
    api.faults().set_delay(Duration::from_secs(2));
    let started = Instant::now();
    let err = kube.cordon("n1").await.unwrap_err();
    assert!(matches!(err, KubeError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_millis(900));
    // A wait on a slow server ends at its own deadline, saying why.
    let started = Instant::now();
    let err = kube
        .wait_node_ready("n1", Duration::from_millis(800))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(1300),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.to_string()
            .contains("no answer from the API server within 300ms"),
        "{err}"
    );
    api.faults().set_delay(Duration::ZERO);

    // 500 on the patch: the error says so, and the next try works.
    api.faults().fail_next("PATCH", "/api/v1/nodes/n1", 500, 1);
    let err = kube.cordon("n1").await.unwrap_err();
    assert_eq!(err.code(), Some(500), "{err}");
    assert!(err.to_string().contains("InternalError"), "{err}");
    kube.cordon("n1").await.unwrap();

    // 500s on evictions are asked again until they pass.
    api.add_deployment("shop", "web", json!({"app": "web"}), 1, &["n1"]);
    api.faults().fail_next("POST", "/eviction", 500, 2);
    let report = kube
        .drain("n1", &fast_policy(), Duration::from_secs(3), &quiet)
        .await
        .unwrap();
    assert_eq!(report.evicted.len(), 1);
    assert_eq!(api.faults().requests_matching("POST", "/eviction"), 3);

    // Garbage with a 200: decoded, refused, said so; a garbage watch stream is
    // survived by the wait (it backs off and watches again).
    api.faults().garbage_next("GET", "/api/v1/nodes/n2", 1);
    let err = kube.cordon("n2").await.unwrap_err();
    assert!(matches!(err, KubeError::BadAnswer { .. }), "{err}");
    assert!(err.to_string().contains("could not be decoded"), "{err}");
    api.set_node_ready("n2", false);
    api.faults().garbage_next("GET", "/api/v1/nodes", 3);
    let k = kube.clone();
    let waiter = tokio::spawn(async move { k.wait_node_ready("n2", Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.set_node_ready("n2", true);
    waiter.await.unwrap().unwrap();

    // 409 while creating the Lease: someone else won.
    api.faults().fail_next("POST", "/leases", 409, 1);
    let err = kube
        .acquire_lock(&LockOptions::new("me".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, KubeError::Lock(LockError::Conflict { .. })),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_refuses_a_second_coordinator_and_is_taken_over_only_when_stale_and_asked() {
    let (api, _, kube) = lab(&["n1"]).await;
    let mut a = LockOptions::new("alice@admin pid 10".into());
    a.ttl = Duration::from_secs(1);
    let guard = kube.acquire_lock(&a).await.unwrap();
    let first = api.lease("kube-system", "cnishift-migration").unwrap();

    let b = LockOptions::new("bob@laptop pid 20".into());
    let err = kube.acquire_lock(&b).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, KubeError::Lock(LockError::Held(_))), "{text}");
    assert!(
        text.contains("alice@admin pid 10") && text.contains("since 20"),
        "who and since when: {text}"
    );

    // Renewed in the background (every third of the 1 s TTL).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let later = api.lease("kube-system", "cnishift-migration").unwrap();
    assert_ne!(later["spec"]["renewTime"], first["spec"]["renewTime"]);
    assert_eq!(later["spec"]["acquireTime"], first["spec"]["acquireTime"]);
    guard.check().unwrap();
    guard.release().await.unwrap();
    assert!(
        api.lease("kube-system", "cnishift-migration").is_none(),
        "released = deleted"
    );

    // A holder that stopped renewing 10 minutes ago.
    api.put_lease("kube-system", "cnishift-migration", json!({"holderIdentity": "ghost@gone pid 1", "leaseDurationSeconds": 30,
        "acquireTime": "2026-01-01T00:00:00.000000Z", "renewTime": "2026-01-01T00:10:00.000000Z", "leaseTransitions": 2}));
    let err = kube.acquire_lock(&b).await.unwrap_err();
    assert!(matches!(err, KubeError::Lock(LockError::Stale(_))), "{err}");
    assert!(
        err.to_string().contains("--take-over-stale-lock")
            && err.to_string().contains("ghost@gone"),
        "{err}"
    );
    let mut take = b.clone();
    take.take_over_stale = true;
    take.ttl = Duration::from_millis(600);
    let guard = kube.acquire_lock(&take).await.unwrap();
    let now = api.lease("kube-system", "cnishift-migration").unwrap();
    assert_eq!(now["spec"]["holderIdentity"], "bob@laptop pid 20");
    assert_eq!(now["spec"]["leaseTransitions"], 3);

    // Someone overwrites it: the next renewal gets a 409 and the guard says the lock is lost.
    api.put_lease(
        "kube-system",
        "cnishift-migration",
        json!({"holderIdentity": "intruder", "leaseDurationSeconds": 30}),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let lost = guard.check().unwrap_err().to_string();
    assert!(lost.contains("intruder"), "{lost}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_recorded_on_the_node() {
    let (api, _, kube) = lab(&["n1"]).await;
    kube.record(
        "n1",
        Step {
            reason: "MigrationDrained",
            action: "Drain",
            note: "3 pods evicted".into(),
            kind: Kind::Normal,
        },
        "me",
    )
    .await
    .unwrap();
    let events = api.events_about("Node", "n1");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["reason"], "MigrationDrained");
    assert_eq!(
        events[0]["regarding"]["uid"],
        api.node("n1").unwrap()["metadata"]["uid"]
    );
    assert_eq!(events[0]["metadata"]["namespace"], "default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_gates_name_what_is_wrong() {
    let nodes = ["opi01", "opi02", "raccoon00", "raccoon01"];
    let (api, addr, kube) = lab(&nodes).await;
    api.add_homelab_workload(&nodes);
    let verdicts = |gates: &[cnishift::kube::gates::Gate]| {
        gates.iter().map(|g| (g.id, g.verdict)).collect::<Vec<_>>()
    };
    let gates = kube.cluster_gates("cilium", Some(addr)).await;
    assert_eq!(
        verdicts(&gates),
        vec![
            ("nodes.ready", Verdict::Pass),
            ("pdbs.blocking", Verdict::Pass),
            ("pods.healthy", Verdict::Pass),
            ("cilium.daemonset", Verdict::Warn),
            ("api.vip", Verdict::Pass)
        ],
        "{gates:#?}"
    );

    api.set_node_ready("raccoon01", false);
    api.add_deployment("shop", "db", json!({"app": "db"}), 1, &["raccoon00"]);
    api.add_pdb("shop", "db-pdb", json!({"app": "db"}), None, Some(0));
    let pending = api.add_deployment("shop", "batch", json!({"app": "batch"}), 1, &["raccoon00"]);
    api.set_pod_phase("shop", &pending[0], "Pending");
    api.add_daemonset_with_pods(
        "cilium",
        "cilium",
        json!({"k8s-app": "cilium"}),
        &["opi01", "opi02"],
        true,
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gates = kube.cluster_gates("cilium", Some(closed)).await;
    let by = |id: &str| gates.iter().find(|g| g.id == id).unwrap().clone();
    assert_eq!(by("nodes.ready").verdict, Verdict::Fail);
    assert!(
        by("nodes.ready").message.contains("raccoon01"),
        "{:?}",
        by("nodes.ready")
    );
    assert_eq!(by("pdbs.blocking").verdict, Verdict::Fail);
    assert!(by("pdbs.blocking").message.contains("shop/db-pdb"));
    assert_eq!(by("pods.healthy").verdict, Verdict::Fail);
    assert!(by("pods.healthy")
        .message
        .contains(&format!("shop/{} Pending", pending[0])));
    assert_eq!(by("cilium.daemonset").verdict, Verdict::Warn);
    assert!(
        by("cilium.daemonset")
            .message
            .contains("4 desired, 2 ready"),
        "{:?}",
        by("cilium.daemonset")
    );
    assert_eq!(by("api.vip").verdict, Verdict::Fail);
    assert!(
        by("api.vip").message.to_lowercase().contains("refused"),
        "{:?}",
        by("api.vip")
    );
}
