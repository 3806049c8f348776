//! Server-side printing (meta.k8s.io/v1 Table) for `kubectl get`.

use super::*;

pub(crate) fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get("accept")
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

pub(crate) fn age(created: &str) -> String {
    // Good enough for a lab: the server lives minutes.
    let _ = created;
    "1m".into()
}

/// Server-side printing, as `kubectl get nodes` asks for it.
pub(crate) fn node_table(nodes: &[&Value], rv: u64) -> Value {
    let rows: Vec<Value> = nodes
        .iter()
        .map(|n| {
            let ready = n["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                .map(|c| c["status"] == "True")
                .unwrap_or(false);
            let mut st = if ready {
                "Ready".to_string()
            } else {
                "NotReady".to_string()
            };
            if n["spec"]["unschedulable"] == json!(true) {
                st.push_str(",SchedulingDisabled");
            }
            let mut roles: Vec<&str> = n["metadata"]["labels"]
                .as_object()
                .map(|l| {
                    l.keys()
                        .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                        .collect()
                })
                .unwrap_or_default();
            roles.sort();
            let roles = if roles.is_empty() {
                "<none>".to_string()
            } else {
                roles.join(",")
            };
            row(
                json!([
                    n["metadata"]["name"],
                    st,
                    roles,
                    age(n["metadata"]["creationTimestamp"].as_str().unwrap_or("")),
                    n["status"]["nodeInfo"]["kubeletVersion"]
                ]),
                n,
            )
        })
        .collect();
    table(
        &[
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Roles", "string", 0),
            ("Age", "string", 0),
            ("Version", "string", 0),
        ],
        rows,
        rv,
    )
}

/// One row of a server-side Table: its cells and the object's metadata.
pub(crate) fn row(cells: Value, obj: &Value) -> Value {
    json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}})
}

/// A meta.k8s.io/v1 Table: columns as (name, type, priority; 1 = only with `-o wide`).
pub(crate) fn table(columns: &[(&str, &str, u8)], rows: Vec<Value>, rv: u64) -> Value {
    let columns: Vec<Value> = columns
        .iter()
        .map(|(name, ty, prio)| json!({"name": name, "type": ty, "format": if *name == "Name" { "name" } else { "" }, "description": name, "priority": prio}))
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": columns,
        "rows": rows,
    })
}

/// Server-side printing of pods, with the columns `kubectl get pods [-o wide]` shows.
pub(crate) fn pod_table(pods: &[Value], rv: u64) -> Value {
    let rows: Vec<Value> = pods
        .iter()
        .map(|p| {
            let ready = usize::from(pod_ready(p));
            let containers = p["spec"]["containers"].as_array().map_or(1, Vec::len);
            row(
                json!([
                    p["metadata"]["name"],
                    format!("{ready}/{containers}"),
                    p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                        .as_str()
                        .map_or(p["status"]["phase"].clone(), |r| json!(r)),
                    p["status"]["containerStatuses"].as_array().map_or(0, |c| c
                        .iter()
                        .filter_map(|c| c["restartCount"].as_i64())
                        .sum::<i64>()),
                    age(p["metadata"]["creationTimestamp"].as_str().unwrap_or("")),
                    p["status"]["podIP"].as_str().unwrap_or("<none>"),
                    p["spec"]["nodeName"]
                ]),
                p,
            )
        })
        .collect();
    table(
        &[
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "integer", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
        ],
        rows,
        rv,
    )
}

/// Server-side printing of core/v1 Events, with the columns `kubectl get
/// events [-o wide]` shows.
pub(crate) fn event_table(events: &[Value], rv: u64) -> Value {
    let rows: Vec<Value> = events
        .iter()
        .map(|e| {
            let when = age(e["lastTimestamp"].as_str().unwrap_or(""));
            let o = &e["involvedObject"];
            row(
                json!([
                    when,
                    e["type"],
                    e["reason"],
                    format!(
                        "{}/{}",
                        o["kind"].as_str().unwrap_or("").to_lowercase(),
                        o["name"].as_str().unwrap_or("")
                    ),
                    o["fieldPath"].as_str().unwrap_or(""),
                    e["source"]["component"].as_str().unwrap_or(""),
                    e["message"],
                    when,
                    e["count"],
                    e["metadata"]["name"]
                ]),
                e,
            )
        })
        .collect();
    table(
        &[
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Subobject", "string", 1),
            ("Source", "string", 1),
            ("Message", "string", 0),
            ("First Seen", "string", 1),
            ("Count", "string", 1),
            ("Name", "string", 1),
        ],
        rows,
        rv,
    )
}
