//! The exact requests the kube-rs code sends, checked with tower-test: a mock
//! service stands where the HTTP connection would be, so each request's
//! method, path, query, content type and body can be asserted on, and the
//! answer is whatever the test sends back.

use std::time::Duration;

use cnishift::inventory::DrainPolicy;
use cnishift::kube::events::{Kind, Step};
use cnishift::kube::lease::LockOptions;
use cnishift::kube::Kube;
use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn mock_kube() -> (Kube, Handle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    (Kube::from_client(client, Duration::from_secs(5)), handle)
}

fn reply(send: mock::SendResponse<Response<Body>>, code: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

async fn next(handle: &mut Handle) -> (Request<Body>, mock::SendResponse<Response<Body>>) {
    tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request within 5 s")
        .expect("the client is alive")
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("body is not JSON ({e}): {bytes:?}"))
}

fn content_type(req: &Request<Body>) -> String {
    req.headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

fn query(req: &Request<Body>) -> String {
    urlencoding_decode(req.uri().query().unwrap_or(""))
}

fn urlencoding_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn node(name: &str, rv: &str, unschedulable: bool, annotations: Value, ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "uid": "0c6f5c1e-0000-4000-8000-000000000001", "resourceVersion": rv, "annotations": annotations},
           "spec": {"unschedulable": unschedulable},
           "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "reason": "KubeletNotReady"}]}})
}

fn deployment_pod(ns: &str, name: &str, uid: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": {"app": "web"},
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9", "uid": "rs-uid", "controller": true}]},
           "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
           "status": {"phase": "Running"}})
}

#[tokio::test]
async fn eviction_has_kind_api_version_and_metadata_and_a_429_is_asked_again_by_our_loop() {
    let (kube, mut handle) = mock_kube();
    let server = tokio::spawn(async move {
        let (req, send) = next(&mut handle).await;
        assert_eq!(req.method(), "GET");
        assert_eq!(req.uri().path(), "/api/v1/pods");
        assert!(
            query(&req).contains("fieldSelector=spec.nodeName=n1"),
            "{}",
            query(&req)
        );
        reply(
            send,
            200,
            &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7"},
                                 "items": [deployment_pod("shop", "web-1", "uid-1")]}),
        );
        let mut posts = 0;
        loop {
            let (req, send) = next(&mut handle).await;
            if req.method() == "GET" {
                // The wait for the pod to be gone: a list by name.
                assert_eq!(req.uri().path(), "/api/v1/namespaces/shop/pods");
                assert!(
                    query(&req).contains("fieldSelector=metadata.name=web-1"),
                    "{}",
                    query(&req)
                );
                reply(
                    send,
                    200,
                    &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "9"}, "items": []}),
                );
                return posts;
            }
            posts += 1;
            assert_eq!(req.method(), "POST");
            assert_eq!(
                req.uri().path(),
                "/api/v1/namespaces/shop/pods/web-1/eviction"
            );
            assert_eq!(content_type(&req), "application/json");
            let body = body_json(req).await;
            assert_eq!(body["kind"], "Eviction", "{body}");
            assert_eq!(body["apiVersion"], "policy/v1", "{body}");
            assert_eq!(body["metadata"]["name"], "web-1", "{body}");
            assert_eq!(body["metadata"]["namespace"], "shop", "{body}");
            if posts == 1 {
                reply(
                    send,
                    429,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 429, "reason": "TooManyRequests",
                    "message": "Cannot evict pod as it would violate the pod's disruption budget.",
                    "details": {"causes": [{"reason": "DisruptionBudget", "message": "The disruption budget web-pdb needs 2 healthy pods and has 2 currently"}]}}),
                );
            } else {
                reply(
                    send,
                    201,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}),
                );
            }
        }
    });
    let policy = DrainPolicy {
        retry_interval: Duration::from_millis(50),
        ..DrainPolicy::default()
    };
    let blocked = std::sync::Mutex::new(vec![]);
    let report = kube
        .drain("n1", &policy, Duration::from_secs(5), &|e| {
            if let cnishift::kube::drain::DrainEvent::Blocked(b) = e {
                blocked.lock().unwrap().push(b);
            }
        })
        .await
        .expect("drained");
    assert_eq!(report.evicted, vec!["shop/web-1".to_string()]);
    assert_eq!(server.await.unwrap(), 2, "one 429, then one accepted POST");
    let blocked = blocked.into_inner().unwrap();
    assert_eq!(blocked.len(), 1);
    assert_eq!(
        blocked[0].pdb.as_deref(),
        Some("shop/web-pdb"),
        "the budget is named from the 429's cause"
    );
}

#[tokio::test]
async fn cordon_is_a_merge_patch_with_the_resource_version_and_the_memory_annotation() {
    let (kube, mut handle) = mock_kube();
    let server = tokio::spawn(async move {
        let (req, send) = next(&mut handle).await;
        assert_eq!(
            (req.method().as_str(), req.uri().path()),
            ("GET", "/api/v1/nodes/n1")
        );
        reply(send, 200, &node("n1", "41", false, json!({}), true));
        let (req, send) = next(&mut handle).await;
        assert_eq!(
            (req.method().as_str(), req.uri().path()),
            ("PATCH", "/api/v1/nodes/n1")
        );
        assert_eq!(content_type(&req), "application/merge-patch+json");
        let body = body_json(req).await;
        assert_eq!(body["spec"]["unschedulable"], true, "{body}");
        assert_eq!(body["metadata"]["resourceVersion"], "41", "{body}");
        assert_eq!(
            body["metadata"]["annotations"]["cnishift.io/unschedulable-before-migration"], "false",
            "{body}"
        );
        reply(
            send,
            200,
            &node(
                "n1",
                "42",
                true,
                json!({"cnishift.io/unschedulable-before-migration": "false"}),
                true,
            ),
        );
    });
    let c = kube.cordon("n1").await.unwrap();
    assert!(!c.was_cordoned && c.changed);
    server.await.unwrap();
}

#[tokio::test]
async fn uncordon_of_an_admin_cordoned_node_only_drops_the_annotation() {
    let (kube, mut handle) = mock_kube();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut handle).await;
        reply(
            send,
            200,
            &node(
                "n1",
                "50",
                true,
                json!({"cnishift.io/unschedulable-before-migration": "true"}),
                true,
            ),
        );
        let (req, send) = next(&mut handle).await;
        assert_eq!(content_type(&req), "application/merge-patch+json");
        let body = body_json(req).await;
        assert!(
            body["spec"].get("unschedulable").is_none(),
            "must not touch unschedulable: {body}"
        );
        assert_eq!(
            body["metadata"]["annotations"]["cnishift.io/unschedulable-before-migration"],
            Value::Null
        );
        assert!(
            body["metadata"]["annotations"]
                .as_object()
                .unwrap()
                .contains_key("cnishift.io/unschedulable-before-migration"),
            "null deletes the key: {body}"
        );
        reply(send, 200, &node("n1", "51", true, json!({}), true));
    });
    assert_eq!(
        kube.uncordon("n1").await.unwrap(),
        cnishift::kube::nodes::Uncordoned::LeftCordonedByAdmin
    );
    server.await.unwrap();
}

#[tokio::test]
async fn the_lease_is_created_with_holder_duration_and_times() {
    let (kube, mut handle) = mock_kube();
    let server = tokio::spawn(async move {
        let (req, send) = next(&mut handle).await;
        assert_eq!(
            req.uri().path(),
            "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/cnishift-migration"
        );
        reply(
            send,
            404,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found"}),
        );
        let (req, send) = next(&mut handle).await;
        assert_eq!(req.method(), "POST");
        assert_eq!(
            req.uri().path(),
            "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"
        );
        assert_eq!(content_type(&req), "application/json");
        let mut body = body_json(req).await;
        assert_eq!(body["kind"], "Lease");
        assert_eq!(body["apiVersion"], "coordination.k8s.io/v1");
        assert_eq!(body["metadata"]["name"], "cnishift-migration");
        assert_eq!(body["spec"]["holderIdentity"], "admin@box pid 1");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 30);
        for t in ["acquireTime", "renewTime"] {
            let v = body["spec"][t].as_str().unwrap_or_default();
            assert!(
                v.len() >= 20 && v.ends_with('Z') && v.contains('.'),
                "{t} is a MicroTime: {v:?}"
            );
        }
        body["metadata"]["resourceVersion"] = json!("3");
        reply(send, 201, &body);
    });
    let guard = kube
        .acquire_lock(&LockOptions::new("admin@box pid 1".into()))
        .await
        .unwrap();
    server.await.unwrap();
    assert!(guard.check().is_ok());
}

#[tokio::test]
async fn a_node_event_names_the_node_by_uid_and_has_what_the_api_requires() {
    let (kube, mut handle) = mock_kube();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut handle).await;
        reply(send, 200, &node("n1", "5", false, json!({}), true));
        let (req, send) = next(&mut handle).await;
        assert_eq!(req.method(), "POST");
        assert_eq!(
            req.uri().path(),
            "/apis/events.k8s.io/v1/namespaces/default/events"
        );
        let body = body_json(req).await;
        assert_eq!(body["kind"], "Event");
        assert_eq!(body["apiVersion"], "events.k8s.io/v1");
        assert_eq!(body["regarding"]["kind"], "Node");
        assert_eq!(body["regarding"]["name"], "n1");
        assert_eq!(
            body["regarding"]["uid"],
            "0c6f5c1e-0000-4000-8000-000000000001"
        );
        assert_eq!(body["reason"], "MigrationCordoned");
        assert_eq!(body["action"], "Cordon");
        assert_eq!(body["type"], "Normal");
        assert_eq!(body["reportingController"], "cnishift.io/coordinator");
        assert_eq!(body["reportingInstance"], "admin@box pid 1");
        assert!(
            body["eventTime"].as_str().is_some_and(|t| t.contains('.')),
            "{body}"
        );
        reply(send, 201, &body);
    });
    kube.record(
        "n1",
        Step {
            reason: "MigrationCordoned",
            action: "Cordon",
            note: "cordoned".into(),
            kind: Kind::Normal,
        },
        "admin@box pid 1",
    )
    .await
    .unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn wait_ready_lists_then_watches_from_the_lists_resource_version() {
    let (kube, mut handle) = mock_kube();
    let server = tokio::spawn(async move {
        let (req, send) = next(&mut handle).await;
        assert_eq!(req.uri().path(), "/api/v1/nodes");
        assert!(!query(&req).contains("watch=true"));
        reply(
            send,
            200,
            &json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "77"},
                                 "items": [node("n1", "70", false, json!({}), false)]}),
        );
        let (req, send) = next(&mut handle).await;
        let q = query(&req);
        for part in [
            "watch=true",
            "resourceVersion=77",
            "allowWatchBookmarks=true",
            "fieldSelector=metadata.name=n1",
            "timeoutSeconds=290",
        ] {
            assert!(q.contains(part), "{part} missing from {q}");
        }
        let line = json!({"type": "MODIFIED", "object": node("n1", "78", false, json!({}), true)});
        send.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(format!("{line}\n").into_bytes()))
                .unwrap(),
        );
    });
    kube.wait_node_ready("n1", Duration::from_secs(5))
        .await
        .unwrap();
    server.await.unwrap();
}
