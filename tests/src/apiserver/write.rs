//! Writes: Lease create/replace/delete with optimistic concurrency, Event
//! creation with validation, pod deletion and policy/v1 Eviction against PDBs.

use super::*;

/// Parses a create/replace body and checks its kind and namespace.
pub(crate) fn parse_object(body: &Bytes, kind: &str, ns: &str) -> Result<Value, Box<Response>> {
    let obj: Value = serde_json::from_slice(body).map_err(|e| {
        Box::new(bad_request(format!(
            "the body of the request was in an unknown format: {e}"
        )))
    })?;
    if obj["kind"] != kind {
        return Err(Box::new(bad_request(format!(
            "the kind in the body ({}) is not {kind}",
            obj["kind"]
        ))));
    }
    if obj["metadata"]["namespace"]
        .as_str()
        .is_some_and(|n| n != ns)
    {
        return Err(Box::new(bad_request(
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
        )));
    }
    Ok(obj)
}

pub(crate) async fn create_lease(
    State(api): State<ApiServer>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Response {
    let mut obj = match parse_object(&body, "Lease", &ns) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let Some(name) = obj["metadata"]["name"].as_str().map(String::from) else {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "Lease.coordination.k8s.io \"\" is invalid: metadata.name: Required value: name or generateName is required".into(), json!({}));
    };
    let mut store = api.store.lock().expect("store");
    if store.get("leases", &ns, &name).is_some() {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("leases.coordination.k8s.io \"{name}\" already exists"),
            json!({"name": name, "group": "coordination.k8s.io", "kind": "leases"}),
        );
    }
    api.ensure_namespace(&mut store, &ns);
    obj["metadata"]["namespace"] = json!(ns);
    obj["metadata"]["uid"] = json!(uid(&format!("lease/{ns}/{name}/{}", store.rv)));
    obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
    let stored = api.commit(&mut store, "ADDED", "leases", obj);
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        stored.to_string(),
    )
        .into_response()
}

/// PUT: optimistic concurrency on `metadata.resourceVersion` (409 when stale).
pub(crate) async fn replace_lease(
    State(api): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let mut obj = match parse_object(&body, "Lease", &ns) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    if obj["metadata"]["name"] != name.as_str() {
        return bad_request("the name of the object does not match the name on the URL".into());
    }
    let mut store = api.store.lock().expect("store");
    let Some(current) = store.get("leases", &ns, &name).cloned() else {
        return not_found("leases.coordination.k8s.io", &name);
    };
    if let Some(rv) = obj["metadata"]["resourceVersion"].as_str() {
        if Some(rv) != current["metadata"]["resourceVersion"].as_str() {
            return conflict("leases.coordination.k8s.io", &name);
        }
    }
    obj["metadata"]["namespace"] = json!(ns);
    obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
    obj["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
    json_response(&api.commit(&mut store, "MODIFIED", "leases", obj))
}

/// DELETE with an optional `preconditions.resourceVersion` (409 when stale).
pub(crate) async fn delete_lease(
    State(api): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let opts: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return bad_request(format!("DeleteOptions: {e}")),
        }
    };
    let mut store = api.store.lock().expect("store");
    let Some(current) = store.get("leases", &ns, &name).cloned() else {
        return not_found("leases.coordination.k8s.io", &name);
    };
    if let Some(rv) = opts["preconditions"]["resourceVersion"].as_str() {
        if Some(rv) != current["metadata"]["resourceVersion"].as_str() {
            return conflict("leases.coordination.k8s.io", &name);
        }
    }
    api.commit(&mut store, "DELETED", "leases", current);
    json_response(
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": name, "group": "coordination.k8s.io", "kind": "leases"}}),
    )
}

/// events.k8s.io/v1 create: the fields `kubectl describe` needs are required,
/// as the real validation requires them.
pub(crate) async fn create_event(
    State(api): State<ApiServer>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Response {
    let mut obj = match parse_object(&body, "Event", &ns) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let mut missing = vec![];
    for field in [
        "reason",
        "action",
        "reportingController",
        "reportingInstance",
        "eventTime",
        "type",
    ] {
        if obj[field].as_str().is_none_or(str::is_empty) {
            missing.push(field);
        }
    }
    if obj["type"]
        .as_str()
        .is_some_and(|t| t != "Normal" && t != "Warning")
    {
        missing.push("type (Normal|Warning)");
    }
    if obj["regarding"]["kind"].as_str().is_none() || obj["regarding"]["name"].as_str().is_none() {
        missing.push("regarding");
    }
    let name = match (
        obj["metadata"]["name"].as_str(),
        obj["metadata"]["generateName"].as_str(),
    ) {
        (Some(n), _) => n.to_string(),
        (None, Some(g)) => {
            let store = api.store.lock().expect("store");
            format!("{g}{:x}", store.rv)
        }
        _ => {
            missing.push("metadata.name");
            String::new()
        }
    };
    if !missing.is_empty() {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!(
                "Event.events.k8s.io {name:?} is invalid: required: {}",
                missing.join(", ")
            ),
            json!({"kind": "Event", "group": "events.k8s.io"}),
        );
    }
    let mut store = api.store.lock().expect("store");
    if store.get("events", &ns, &name).is_some() {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("events.events.k8s.io \"{name}\" already exists"),
            json!({}),
        );
    }
    api.ensure_namespace(&mut store, &ns);
    obj["metadata"]["name"] = json!(name);
    obj["metadata"]["namespace"] = json!(ns);
    obj["metadata"]["uid"] = json!(uid(&format!("event/{ns}/{name}")));
    obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
    let stored = api.commit(&mut store, "ADDED", "events", obj);
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        stored.to_string(),
    )
        .into_response()
}

/// Deletes a pod and, for a ReplicaSet's pod, starts its replacement (not yet
/// Ready: the lab decides when) on a schedulable, Ready node.
pub(crate) fn remove_pod(api: &ApiServer, store: &mut Store, pod: Value) -> Value {
    let deleted = api.commit(store, "DELETED", "pods", pod.clone());
    let owner = pod["metadata"]["ownerReferences"]
        .as_array()
        .and_then(|o| {
            o.iter()
                .find(|o| o["kind"] == "ReplicaSet" || o["kind"] == "StatefulSet")
        })
        .and_then(|o| {
            Some((
                o["kind"].as_str()?.to_string(),
                o["name"].as_str()?.to_string(),
            ))
        });
    if let Some((kind, owner)) = owner {
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let from = pod["spec"]["nodeName"].as_str().unwrap_or("").to_string();
        let target = store
            .list("nodes", None)
            .into_iter()
            .find(|n| {
                n["metadata"]["name"] != from.as_str()
                    && n["spec"]["unschedulable"] != json!(true)
                    && node_ready(n)
            })
            .and_then(|n| n["metadata"]["name"].as_str())
            .map(String::from);
        if let Some(node) = target {
            // A ReplicaSet's replacement has a new name; a StatefulSet's keeps
            // its pod's name (and so its claim).
            let name = if kind == "StatefulSet" {
                pod["metadata"]["name"].as_str().unwrap_or("").to_string()
            } else {
                store.next_pod += 1;
                format!("{owner}-r{:05}", store.next_pod)
            };
            let replacement = pod_object(&Pod {
                ns: &ns,
                name: &name,
                node: &node,
                owner: if kind == "StatefulSet" {
                    Owner::StatefulSet(&owner)
                } else {
                    Owner::ReplicaSet(&owner)
                },
                labels: pod["metadata"]["labels"].clone(),
                ready: false,
                empty_dir: false,
            });
            api.commit(store, "ADDED", "pods", replacement);
        }
    }
    deleted
}

pub(crate) async fn delete_pod(
    State(api): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let mut store = api.store.lock().expect("store");
    let Some(pod) = store.get("pods", &ns, &name).cloned() else {
        return not_found("pods", &name);
    };
    let deleted = remove_pod(&api, &mut store, pod);
    json_response(&deleted)
}

/// policy/v1 Eviction: refused with 429 (and the body a real server sends)
/// when a PodDisruptionBudget covering the pod allows no disruption.
pub(crate) async fn evict_pod(
    State(api): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let eviction: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("the body of the request was in an unknown format: {e}"),
                json!({}),
            )
        }
    };
    if eviction["kind"] != "Eviction" || eviction["metadata"]["name"] != name.as_str() {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "name in URL does not match name in Eviction object".into(),
            json!({"name": name, "group": "policy", "kind": "Eviction"}),
        );
    }
    let mut store = api.store.lock().expect("store");
    let Some(pod) = store.get("pods", &ns, &name).cloned() else {
        return not_found("pods", &name);
    };
    let pdbs: Vec<Value> = store
        .list("poddisruptionbudgets", Some(&ns))
        .into_iter()
        .filter(|b| labels_match(&b["spec"]["selector"], &pod["metadata"]["labels"]))
        .cloned()
        .collect();
    if pdbs.len() > 1 {
        return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.".into(), json!({}));
    }
    if let Some(pdb) = pdbs.first() {
        let (allowed, healthy, desired, _) = pdb_status(&store, pdb);
        // A pod that is not Ready does not count against the budget.
        if allowed < 1 && pod_ready(&pod) {
            let pdb_name = pdb["metadata"]["name"].as_str().unwrap_or("");
            return status(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Cannot evict pod as it would violate the pod's disruption budget.".into(),
                json!({"causes": [{"reason": "DisruptionBudget", "message": format!("The disruption budget {pdb_name} needs {desired} healthy pods and has {healthy} currently")}]}),
            );
        }
    }
    remove_pod(&api, &mut store, pod);
    (StatusCode::CREATED, [("content-type", "application/json")], json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}).to_string()).into_response()
}
