//! Reads: lists, gets, field and label selectors, core/v1 Events.

use super::*;

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListParams {
    pub(crate) watch: Option<String>,
    pub(crate) field_selector: Option<String>,
    pub(crate) label_selector: Option<String>,
    pub(crate) resource_version: Option<String>,
    pub(crate) timeout_seconds: Option<u64>,
    pub(crate) allow_watch_bookmarks: Option<bool>,
}

/// Field selectors kubectl and kube-rs use: `metadata.name`, `metadata.namespace`,
/// `spec.nodeName`, `spec.unschedulable`, `status.phase` (with `=`, `==`, `!=`).
pub(crate) fn matches(obj: &Value, p: &ListParams) -> bool {
    if let Some(fs) = &p.field_selector {
        for term in fs.split(',').filter(|t| !t.is_empty()) {
            let (neg, (k, v)) = match term.split_once("!=") {
                Some(kv) => (true, kv),
                None => (
                    false,
                    term.split_once('=')
                        .map(|(k, v)| (k, v.trim_start_matches('=')))
                        .unwrap_or((term, "")),
                ),
            };
            let actual = match k {
                "metadata.name" => obj["metadata"]["name"].as_str().unwrap_or("").to_string(),
                "metadata.namespace" => obj["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                "spec.nodeName" => obj["spec"]["nodeName"].as_str().unwrap_or("").to_string(),
                "status.phase" => obj["status"]["phase"].as_str().unwrap_or("").to_string(),
                "spec.unschedulable" => (obj["spec"]["unschedulable"] == json!(true)).to_string(),
                // Any other field by its path (events: involvedObject.name, regarding.kind, ...).
                path => match obj.pointer(&format!("/{}", path.replace('.', "/"))) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(v) => v.to_string(),
                },
            };
            if (actual == v) == neg {
                return false;
            }
        }
    }
    if let Some(ls) = &p.label_selector {
        for term in ls.split(',').filter(|t| !t.is_empty()) {
            let ok = match term.split_once("!=") {
                Some((k, v)) => obj["metadata"]["labels"][k] != json!(v),
                None => match term.split_once('=') {
                    Some((k, v)) => {
                        obj["metadata"]["labels"][k.trim_end_matches('=')]
                            == json!(v.trim_start_matches('='))
                    }
                    None => obj["metadata"]["labels"].get(term).is_some(),
                },
            };
            if !ok {
                return false;
            }
        }
    }
    true
}

pub(crate) fn is_watch(p: &ListParams) -> bool {
    p.watch.as_deref().is_some_and(|w| w == "true" || w == "1")
}

/// A list (or a watch, with `watch=true`) of `resource`, optionally in `ns`.
pub(crate) async fn list_or_watch(
    api: ApiServer,
    resource: &'static str,
    ns: Option<String>,
    p: ListParams,
    headers: &HeaderMap,
) -> Response {
    if is_watch(&p) {
        // `kubectl get nodes -w` asks for server-side printing of each event.
        let table = wants_table(headers) && ["nodes", "pods"].contains(&resource);
        return watch(api, resource, ns, p, table).await;
    }
    let store = api.store.lock().expect("store");
    let items: Vec<Value> = store
        .list(resource, ns.as_deref())
        .into_iter()
        .filter(|o| matches(o, &p))
        .map(|o| decorate(&store, resource, o.clone()))
        .collect();
    if resource == "nodes" && wants_table(headers) {
        return json_response(&node_table(&items.iter().collect::<Vec<_>>(), store.rv));
    }
    if resource == "pods" && wants_table(headers) {
        return json_response(&pod_table(&items, store.rv));
    }
    let (kind, api_version) = type_of(resource);
    json_response(
        &json!({"kind": format!("{kind}List"), "apiVersion": api_version, "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}),
    )
}

pub(crate) async fn get_node(
    State(api): State<ApiServer>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let store = api.store.lock().expect("store");
    match store.get("nodes", "", &name) {
        Some(n) if wants_table(&headers) => json_response(&node_table(&[n], store.rv)),
        Some(n) => json_response(n),
        None => not_found("nodes", &name),
    }
}

pub(crate) fn get_namespaced(
    api: &ApiServer,
    resource: &'static str,
    ns: &str,
    name: &str,
) -> Response {
    let store = api.store.lock().expect("store");
    match store.get(resource, ns, name) {
        Some(o) => json_response(&decorate(&store, resource, o.clone())),
        None => not_found(resource, name),
    }
}

pub(crate) async fn list_all<const R: usize>(
    State(api): State<ApiServer>,
    Query(p): Query<ListParams>,
    headers: HeaderMap,
) -> Response {
    list_or_watch(api, RESOURCES[R], None, p, &headers).await
}

pub(crate) async fn list_in<const R: usize>(
    State(api): State<ApiServer>,
    Path(ns): Path<String>,
    Query(p): Query<ListParams>,
    headers: HeaderMap,
) -> Response {
    list_or_watch(api, RESOURCES[R], Some(ns), p, &headers).await
}

pub(crate) async fn get_in<const R: usize>(
    State(api): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    get_namespaced(&api, RESOURCES[R], &ns, &name)
}

/// A cluster-scoped object (PersistentVolumes, CustomResourceDefinitions).
pub(crate) async fn get_cluster<const R: usize>(
    State(api): State<ApiServer>,
    Path(name): Path<String>,
) -> Response {
    get_namespaced(&api, RESOURCES[R], "", &name)
}

/// An events.k8s.io/v1 Event as the core/v1 API shows the same object.
pub(crate) fn core_event(e: &Value) -> Value {
    let time = e["eventTime"].clone();
    json!({
        "kind": "Event", "apiVersion": "v1", "metadata": e["metadata"],
        "involvedObject": e["regarding"], "reason": e["reason"], "message": e["note"], "type": e["type"],
        "source": {"component": e["reportingController"]}, "reportingComponent": e["reportingController"],
        "reportingInstance": e["reportingInstance"], "action": e["action"], "eventTime": time,
        "firstTimestamp": e["metadata"]["creationTimestamp"], "lastTimestamp": e["metadata"]["creationTimestamp"],
        "count": e["series"]["count"].as_i64().unwrap_or(1),
    })
}

pub(crate) async fn core_events(
    api: ApiServer,
    ns: Option<String>,
    p: ListParams,
    headers: &HeaderMap,
) -> Response {
    let store = api.store.lock().expect("store");
    let items: Vec<Value> = store
        .list("events", ns.as_deref())
        .into_iter()
        .map(core_event)
        .filter(|e| matches(e, &p))
        .collect();
    if wants_table(headers) {
        return json_response(&event_table(&items, store.rv));
    }
    json_response(
        &json!({"kind": "EventList", "apiVersion": "v1", "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}),
    )
}

pub(crate) async fn list_core_events(
    State(api): State<ApiServer>,
    Query(p): Query<ListParams>,
    headers: HeaderMap,
) -> Response {
    core_events(api, None, p, &headers).await
}

pub(crate) async fn list_core_events_in(
    State(api): State<ApiServer>,
    Path(ns): Path<String>,
    Query(p): Query<ListParams>,
    headers: HeaderMap,
) -> Response {
    core_events(api, Some(ns), p, &headers).await
}
